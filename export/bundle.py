"""``llava-edge export``: a checkpoint -> a bundle directory with its manifest.

Targets (``--target``):

- ``onnx``: the vision tower + projector as ``vision.fp32.onnx`` (always: it is
  the reference and the source of every other vision variant), plus
  ``vision.fp16.onnx`` with ``--dtype fp16``. Both are compared with the Hugging
  Face model on a few rendered, preprocessed images and the numbers recorded.
- ``gguf``: the language model as ``llm.<outtype>.gguf`` for llama.cpp.
- ``mmproj``: llama.cpp's multimodal projector ``mmproj.<f32|f16|bf16>.gguf``
  (``--mmproj-outtype``; by default ``f16`` with ``--dtype fp16``, else ``f32``),
  plus the text GGUF when the bundle has none (llama.cpp's mtmd loads both).
- ``tensorrt``: a TensorRT engine ``vision.trt-<precision>.engine`` built from
  the fp32 ONNX on this machine's GPU: precision ``--dtype`` (fp32 or fp16), or
  ``int8`` with ``--int8`` and a calibration cache.
- ``all``: onnx + gguf + mmproj, plus tensorrt where TensorRT and a GPU are
  usable (otherwise a log line says why it was skipped), and mmproj only where
  llama.cpp's CLIP supports the checkpoint.

Atomicity and re-runs:

- All bad input is found before the output directory is created or changed:
  :func:`check_out_dir` refuses a directory that is not a bundle, and each
  target's cheap checks (vocabulary size, mmproj support, TensorRT present,
  model loadable) run first.
- Every file is produced in a staging folder inside the bundle
  (``.export-staging.partial``, deleted afterwards and by the next run) and
  renamed into place when complete. A file a finished manifest lists is first
  unregistered from it, so ``manifest.json`` never lists a file whose content
  differs from what it recorded.
- While the export runs, its progress is ``manifest.incomplete.json`` (see
  :mod:`llava_edge.manifest`); ``manifest.json`` is written last. A killed
  export thus leaves no bundle that looks complete, and running it again
  continues: a file already registered with the same source, the same options
  and a matching sha256 is not redone ("up to date").
- The source is identified by the checkpoint's fingerprint (config and
  safetensors headers) and a stamp of its files' names, sizes and modification
  times (retrained weights keep their headers). A different source starts
  clean: every file the old bundle registered (quantized variants included,
  they derive from the old weights) is removed.
- Errors are one line (:class:`UserError`); a full disk or another write error
  names the file being written.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from llava_edge import __version__, atomic, bundle_lock, manifest
from llava_edge.checkpoint import Checkpoint, load_hf_vision_half, source_record
from llava_edge.errors import UserError, describe_os_error
from llava_edge.quality import FP32_GRAPH_MIN_COSINE
from llava_edge.templates import CHAT_TEMPLATE, MODES, get_template
from llava_edge.tokenizer import FILES as TOKENIZER_FILES
from llava_edge.tokenizer import read_settings
from llava_edge.variants import VariantMaker

from .llm_gguf import OUTTYPES as LLM_OUTTYPES
from .llm_gguf import check_exportable, export_llm_gguf, text_arch
from .mmproj_gguf import OUTTYPES as MMPROJ_OUTTYPES
from .mmproj_gguf import export_mmproj_gguf
from .tensorrt_engine import CALIBRATION_CACHE, DEFAULT_MAX_BATCH, TIMING_CACHE, build_engine, engine_file_name
from .vision_fp16 import convert_vision_fp16, fp16_options
from .vision_onnx import MAX_BATCH, OPSET, export_vision_onnx, parity_vs_hf

TARGETS = ("onnx", "tensorrt", "gguf", "mmproj", "all")
DTYPES = ("fp32", "fp16")
FP32_ONNX = "vision.fp32.onnx"
FP16_ONNX = "vision.fp16.onnx"
PARITY_IMAGES = 4
_VARIANT_KEYS = ("name", "kind", "precision", "file", "size", "sha256", "format", "options")


# -- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRTOptions:
    """How ``--target tensorrt`` builds its engine (see ``export/tensorrt_engine.py``)."""

    max_batch: int | None = None  # None: DEFAULT_MAX_BATCH, or every tile of the family's largest picture
    opt_batch: int = 1
    int8: bool = False
    calibration_cache: Path | None = None  # default: BUNDLE/tensorrt.int8.calib (what `llava-edge quantize` writes)
    workspace_mib: int | None = None


@dataclass(frozen=True)
class ExportOptions:
    target: str = "all"
    dtype: str = "fp32"
    llm_outtype: str = "f32"
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    mmproj: str = ""  # --mmproj-outtype; "": follow --dtype (see mmproj_outtype)
    conv_mode: str | None = None  # --conv-mode; None: the bundle's (same source), else the checkpoint's
    wait: bool = True  # another writer holds the bundle: wait for it (False: --no-wait, a one-line error)
    max_tiles: int | None = None  # --max-tiles: the most grid tiles a picture may take (tiled families)

    def validate(self) -> None:
        """Every option checked before anything is read or written; a one-line error listing the valid values."""
        if self.target not in TARGETS:
            raise UserError(f"unknown --target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.dtype not in DTYPES:
            raise UserError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.llm_outtype not in LLM_OUTTYPES:
            raise UserError(f"unknown --llm-outtype {self.llm_outtype!r}; choose one of {', '.join(LLM_OUTTYPES)}")
        if self.mmproj and self.mmproj not in MMPROJ_OUTTYPES:
            raise UserError(f"unknown --mmproj-outtype {self.mmproj!r}; choose one of {', '.join(MMPROJ_OUTTYPES)}")
        if self.conv_mode is not None and self.conv_mode not in MODES:
            raise UserError(f"unknown --conv-mode {self.conv_mode!r}; known: {', '.join(MODES)}")
        if self.mmproj and self.target not in ("mmproj", "all"):
            raise UserError("--mmproj-outtype is for llama.cpp's mmproj: use --target mmproj or all")
        t = self.tensorrt
        if t.max_batch is not None and not 1 <= t.opt_batch <= t.max_batch:
            raise UserError(f"TensorRT batch sizes need 1 <= --trt-opt-batch ({t.opt_batch}) "
                            f"<= --trt-max-batch ({t.max_batch})")
        if not 1 <= t.opt_batch <= MAX_BATCH:
            raise UserError(f"--trt-opt-batch {t.opt_batch} is outside 1..{MAX_BATCH}")
        if t.max_batch is not None and t.max_batch > MAX_BATCH:
            raise UserError(f"--trt-max-batch {t.max_batch} is above the ONNX graph's batch limit {MAX_BATCH}")
        if t.workspace_mib is not None and t.workspace_mib < 1:
            raise UserError("--trt-workspace-mib must be at least 1")
        if (t.int8 or t.calibration_cache) and self.target not in ("tensorrt", "all"):
            raise UserError("--int8 and --calibration-cache are for TensorRT engines: use --target tensorrt or all")

    @property
    def mmproj_outtype(self) -> str:
        return self.mmproj or ("f16" if self.dtype == "fp16" else "f32")

    @property
    def trt_precision(self) -> str:
        return "int8" if self.tensorrt.int8 else self.dtype


# -- the output directory --------------------------------------------------------------------------


def check_out_dir(out: str | Path) -> None:
    """Refuse an ``--out`` that export must not write into; reads only, creates nothing.

    Accepted: a path that does not exist, an empty directory, a bundle, or a
    bundle whose export did not finish. Refused: a file, and a non-empty
    directory that is none of these (it is someone's data).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (manifest.is_bundle(out) or manifest.is_incomplete(out)):
        raise UserError(f"--out {out} is an existing directory that is not a bundle; choose a new or empty one")


def prepare_out_dir(out: str | Path) -> None:
    """Create ``out`` and delete temporaries a killed run left; call after :func:`check_out_dir`."""
    out = Path(out)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.remove_partials(out)


# -- the source ------------------------------------------------------------------------------------


def same_source(a: dict, b: dict) -> bool:
    return a.get("fingerprint") == b.get("fingerprint") and a.get("stamp") == b.get("stamp")


# -- progress --------------------------------------------------------------------------------------


class Progress(Protocol):
    """Where export reports: ``message`` for lines, ``step`` around each long step (its callback takes done, total)."""

    def message(self, text: str) -> None: ...

    def step(self, label: str, total: int | None = None) -> contextlib.AbstractContextManager[
        Callable[[int, int], None]]: ...


class PlainProgress:
    """Log lines only (pipes, CI logs): one when a step starts, then one per tenth of a counted step after 2 s."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log

    def message(self, text: str) -> None:
        self.log(text)

    @contextlib.contextmanager
    def step(self, label: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
        self.log(label)
        start, shown = time.monotonic(), 0

        def update(done: int, n: int) -> None:
            nonlocal shown
            tenth = done * 10 // max(n, 1)
            if shown < tenth < 10 and time.monotonic() - start > 2:
                shown = tenth
                self.log(f"  {done}/{n} ({tenth * 10}%)")

        yield update


class RichProgress:
    """A rich progress bar per step on a terminal (a spinner where the step has no count)."""

    def __init__(self, log: Callable[[str], None] = print):
        from rich.console import Console

        self.log = log
        self.console = Console(stderr=True)
        self._live = None

    def message(self, text: str) -> None:
        if self._live is not None:  # above the bar, not through it
            self._live.console.print(text, markup=False, highlight=False)
        else:
            self.log(text)

    @contextlib.contextmanager
    def step(self, label: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                   TimeElapsedColumn()]
        last = {"n": total}

        def update(done: int, n: int) -> None:
            last["n"] = n
            bar.update(task, completed=done, total=n, count=f"{done}/{n}")

        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(label, total=total, count=f"0/{total}" if total else "")
            self._live = bar
            try:
                yield update
                n = last["n"] or 1
                bar.update(task, completed=n, total=n)  # a step without counts shows a full bar when done
            finally:
                self._live = None


def terminal_progress(log: Callable[[str], None]) -> Progress:
    """Bars when stderr is a terminal, plain log lines otherwise."""
    return RichProgress(log) if sys.stderr.isatty() else PlainProgress(log)


# -- export ----------------------------------------------------------------------------------------


def export_bundle(
    ckpt: Checkpoint,
    out: str | Path,
    target: str = "all",
    dtype: str = "fp32",
    llm_outtype: str = "f32",
    *,
    mmproj_outtype: str = "",
    tensorrt: TensorRTOptions | None = None,
    conv_mode: str | None = None,
    wait: bool = True,
    max_tiles: int | None = None,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> manifest.Manifest:
    """Export ``ckpt`` into the bundle ``out`` (see the module docstring); return the manifest written.

    ``conv_mode``: the bundle's conversation mode; by default a bundle exported again from the same source keeps
    its mode, a new one takes the checkpoint's (``Checkpoint.conv_mode``).
    """
    opts = ExportOptions(target, dtype, llm_outtype, tensorrt or TensorRTOptions(), mmproj_outtype, conv_mode, wait,
                         max_tiles)
    opts.validate()
    ckpt.family.check_max_tiles(max_tiles)
    return _Export(ckpt, Path(out), opts, progress or PlainProgress(log)).run()


def tensorrt_unavailable() -> str | None:
    """Why a TensorRT engine cannot be built here (no TensorRT, no cuda-python, no GPU), or None."""
    from llava_edge.runtimes.tensorrt_vision import running_platform

    try:
        running_platform()
    except UserError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a CUDA error without a GPU or driver
        return f"no usable NVIDIA GPU ({type(e).__name__}: {e})"
    return None


def parity_pixels(ckpt: Checkpoint, n: int = PARITY_IMAGES):
    """``n`` toy scenes rendered at the tower's size and preprocessed as the runtime does (fixed seed)."""
    import numpy as np

    from llava_edge.preprocess import preprocess
    from llava_edge.scenes import random_scene, render

    spec = ckpt.image_spec()
    rng = random.Random(0)
    return np.stack([preprocess(render(random_scene(rng), size=spec.crop, rng=rng), spec) for _ in range(n)])


class _Export:
    def __init__(self, ckpt: Checkpoint, out: Path, opts: ExportOptions, progress: Progress):
        self.ckpt, self.out, self.opts, self.progress = ckpt, out, opts, progress
        self.log = progress.message
        self.status: dict[str, str] = {}  # file -> "new" | "up to date"
        self.maker: VariantMaker | None = None  # once the state to continue from is known
        self._model = None

    # -- plan (reads only) ----------------------------------------------------------------------------------------
    def run(self) -> manifest.Manifest:
        out = self.out
        check_out_dir(out)
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the bundle folder {out}: {describe_os_error(e)}") from None
        try:
            with bundle_lock.writing(out, wait=self.opts.wait, log=self.log):
                return self._run_locked()
        except BaseException:
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # nothing was written: leave no empty folder behind
            raise

    def _run_locked(self) -> manifest.Manifest:
        """The export, while this process is the bundle's only writer: read the state, plan, write, register."""
        ckpt, out = self.ckpt, self.out
        check_out_dir(out)  # again, now that no other writer can change it
        self.tokenizer = read_settings(ckpt.path)  # how LLaVA's code tokenizes for this checkpoint
        self.adds_bos = self.tokenizer.add_bos
        self.conv_mode = self.opts.conv_mode or ckpt.conv_mode
        if self.opts.conv_mode is not None:  # a mode the bundle can prompt with, before any write
            get_template(self.conv_mode, ckpt.chat_template(), self.tokenizer.special_tokens_map())
        self.source = source_record(ckpt)
        self.m, stale, fresh = self._previous_state()
        self.maker = VariantMaker(out, self.m, manifest.write_incomplete, self.log)
        get_template(self.m.conv_mode, self.m.chat_template, self.tokenizer.special_tokens_map())
        steps = self._plan()
        if self._needs_model():
            self._model = self._load_model()  # a model that does not load fails here, before any write

        # -- write -------------------------------------------------------------------------------------------------
        current = "the bundle folder"
        try:
            prepare_out_dir(out)
            if fresh:
                current = manifest.IN_PROGRESS
                manifest.write_incomplete(out, self.m)  # marks the folder as a bundle being written, before any file
            for name in stale:  # a clean start: the old source's files (only files llava-edge makes), then its manifest
                path = out / name if name == manifest.MANIFEST else manifest.own_file(out, name)
                if path is not None:
                    path.unlink(missing_ok=True)
            current = "the tokenizer files"
            self._copy_tokenizer()
            current = "the family's side arrays"
            self._write_arrays()
            for file, run in steps:
                current = file
                run()
        except OSError as e:
            raise UserError(f"export failed while writing {current} into {out}: {describe_os_error(e)}") from None
        finally:
            self._model = None
        self.m.vision["parity"] = {v.name: v.extra["quality"] for v in self.m.variants if v.kind == "vision"
                                   and (v.extra.get("quality") or {}).get("against") == "huggingface"}
        self.m.created_by = f"llava-edge {__version__}"
        try:
            manifest.finish(out, self.m)
        except OSError as e:
            raise UserError(f"export failed while writing {manifest.MANIFEST} into {out}: "
                            f"{describe_os_error(e)}") from None
        self._summary()
        return self.m

    def _previous_state(self) -> tuple[manifest.Manifest, list[str], bool]:
        """What the bundle holds now: (manifest to continue from, files to delete first, whether to write a new
        unfinished-export state before anything else: a new bundle or a clean start)."""
        out, source = self.out, self.source
        older: list[str] = []
        try:
            finished = manifest.read(out) if manifest.is_bundle(out) else None
        except manifest.OlderSchema as e:  # an older llava-edge's bundle: start clean, removing what it listed
            self.log(f"{out} was exported by an older llava-edge (another manifest schema): starting clean")
            finished, older = None, e.files
        try:
            unfinished = manifest.read_incomplete(out) if manifest.is_incomplete(out) else None
        except manifest.OlderSchema as e:
            unfinished, older = None, older + e.files
        previous = [m for m in (finished, unfinished) if m is not None]
        same = [m for m in previous if same_source(m.source, source)]
        other = [m for m in previous if not same_source(m.source, source)]
        base = self._new_manifest()
        for m in same:  # the finished manifest first, the unfinished export's newer state over it
            for v in m.variants:
                if not self._present(v):
                    continue
                at = [i for i, x in enumerate(base.variants) if (x.kind, x.name) == (v.kind, v.name)]
                if at:
                    base.variants[at[0]] = v  # in place: the first variant of a kind is the default one
                else:
                    base.variants.append(v)
            base.llm = {**base.llm, **m.llm}
            if self.opts.conv_mode is None:  # the mode the bundle was given stays until another is asked for
                base.conv_mode, base.chat_template = m.conv_mode, m.chat_template
        keep = {v.file for v in base.variants}
        stale: list[str] = []
        for m in other:
            self.log(f"{out} was exported from {m.source.get('model')} (fingerprint "
                     f"{str(m.source.get('fingerprint'))[:12]}); the source is now {source['model']} (fingerprint "
                     f"{source['fingerprint'][:12]}) or its files changed: starting clean")
            for v in m.variants:
                stale += [v.file, v.file + ".data"]
        for f in older:
            stale += [f, f + ".data"]
        if other or older:
            stale += [*TOKENIZER_FILES, CALIBRATION_CACHE]
        stale = [f for f in dict.fromkeys(stale) if f not in keep and (p := manifest.own_file(out, f)) is not None
                 and p.exists()]
        if (finished is not None and finished in other) or (older and manifest.is_bundle(out)):
            stale.append(manifest.MANIFEST)  # deleted last, after the files it lists
        return base, stale, not same or bool(other) or bool(older)

    def _present(self, v: manifest.Variant) -> bool:
        p = self.out / v.file
        if p.is_file() and p.stat().st_size == v.size:
            return True
        self.log(f"{v.file}: missing or changed since it was registered; dropped from the manifest")
        return False

    def _new_manifest(self) -> manifest.Manifest:
        ckpt = self.ckpt
        vc, tc = ckpt.vision_config, ckpt.text_config
        n_head = int(tc["num_attention_heads"])
        return manifest.Manifest(
            source=self.source,
            conv_mode=self.conv_mode,
            chat_template=ckpt.chat_template() if self.conv_mode == CHAT_TEMPLATE else None,
            family=ckpt.family.name,
            image=ckpt.family.image_section(ckpt, self.opts.max_tiles),
            vision={
                "feature_layer": ckpt.config.get("vision_feature_layer", -2),
                "select_strategy": ckpt.config.get("vision_feature_select_strategy", "default"),
                "num_image_tokens": ckpt.num_image_tokens(),
                "embed_dim": int(tc["hidden_size"]),
                "image_size": int(vc.get("image_size", 336)),
                "patch_size": int(vc.get("patch_size", 14)),
                "tower_width": int(vc["hidden_size"]),
                "tower_layers": int(vc["num_hidden_layers"]),
                "opset": OPSET,
            },
            llm={
                "arch": text_arch(tc, ckpt.path).name,
                "n_embd": int(tc["hidden_size"]),
                "n_layer": int(tc["num_hidden_layers"]),
                "n_head": n_head,
                "n_head_kv": int(tc.get("num_key_value_heads") or n_head),
                "n_ctx_train": int(tc.get("max_position_embeddings", 4096)),
                "image_token_id": ckpt.image_token_id,
            },
            tokenizer={**self.tokenizer.to_dict(),
                       "sha256": {self.tokenizer.file: manifest.sha256_file(ckpt.path / self.tokenizer.file)}},
        )

    def _plan(self) -> list[tuple[str, Callable[[], object]]]:
        """The steps of this target, in order, after each one's cheap checks; logs what ``all`` skips."""
        o, t = self.opts, self.opts.target
        steps: list[tuple[str, Callable[[], object]]] = []
        if t in ("onnx", "tensorrt", "all"):
            steps.append((FP32_ONNX, self.vision_fp32))
            if o.dtype == "fp16" and t != "tensorrt":
                steps.append((FP16_ONNX, self.vision_fp16))
        if t in ("gguf", "all"):
            self._check_llm()
            steps.append((self._llm_file(), self.llm))
        if t in ("mmproj", "all"):
            try:
                self._check_mmproj()
                if not any(v.kind == "llm" for v in self.m.variants) and t == "mmproj":
                    self._check_llm()  # llama.cpp's mtmd loads the projector with a text model
                    steps.append((self._llm_file(), self.llm))
                steps.append((f"mmproj.{o.mmproj_outtype}.gguf", self.mmproj))
            except UserError as e:
                if t != "all":
                    raise
                self.log(f"mmproj: skipped ({e})")
        if t in ("tensorrt", "all"):
            reason = tensorrt_unavailable()
            tiles = self.ckpt.family.most_tiles(self.m.image)
            asked = o.tensorrt.max_batch
            if asked is not None and tiles > asked:  # the engine's profile must take every tile of one picture at once
                raise UserError(f"--trt-max-batch {asked} is below the {tiles} tiles one picture can "
                                f"take: raise it, or bound the tiles with --max-tiles {asked - 1}")
            if asked is None:
                if tiles > MAX_BATCH and (reason is None or t == "tensorrt"):
                    raise UserError(f"one picture can take {tiles} tiles, over the vision graph's batch limit "
                                    f"{MAX_BATCH}: bound them with --max-tiles {MAX_BATCH - 1}")
                o = self.opts = dataclasses.replace(o, tensorrt=dataclasses.replace(
                    o.tensorrt, max_batch=max(DEFAULT_MAX_BATCH, tiles, o.tensorrt.opt_batch)))
            if reason is None:
                self._calibration_cache()  # --int8 without a cache is an error even under `all`
                steps.append((engine_file_name(o.trt_precision), self.tensorrt))
            elif t == "tensorrt":
                raise UserError(reason)
            else:
                self.log(f"tensorrt: skipped ({reason})")
        return steps

    def _check_llm(self) -> None:
        """What export_llm_gguf would refuse, before any file is written."""
        check_exportable(self.ckpt, self.opts.llm_outtype)

    def _check_mmproj(self) -> None:
        from .mmproj_gguf import check_supported, plan_tensors, positive_feature_layers

        check_supported(self.ckpt)
        plan_tensors(self.ckpt, self.opts.mmproj_outtype, max(positive_feature_layers(self.ckpt.config)))

    def _calibration_cache(self) -> Path | None:
        if not self.opts.tensorrt.int8:
            return None
        cache = self.opts.tensorrt.calibration_cache or self.out / CALIBRATION_CACHE
        if not Path(cache).is_file():
            raise UserError(f"--int8 needs a TensorRT calibration cache and {cache} does not exist: make one with "
                            "`llava-edge quantize` or pass --calibration-cache FILE")
        return Path(cache)

    def _llm_file(self) -> str:
        return f"llm.{self.opts.llm_outtype}.gguf"

    def _needs_model(self) -> bool:
        """Whether a vision ONNX step will run (it needs the Hugging Face model for export and parity)."""
        t = self.opts.target
        if t not in ("onnx", "tensorrt", "all"):
            return False
        fp32 = self._up_to_date("vision", "fp32", FP32_ONNX, self._fp32_options())
        if fp32 is None:
            return True
        if self.opts.dtype == "fp16" and t != "tensorrt":
            return self._up_to_date("vision", "fp16", FP16_ONNX, fp16_options(fp32)) is None
        return False

    @property
    def model(self):
        if self._model is None:
            self._model = self._load_model()
        return self._model

    def _load_model(self):
        if isinstance(self.progress, PlainProgress):  # no terminal: no transformers bars in the log either
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        model = load_hf_vision_half(self.ckpt)  # the vision graph needs no language model (7B: 28 GB fp32)
        for name, p in model.named_parameters():
            if p.numel() and not bool(p.isfinite().all()):
                raise UserError(f"the checkpoint's tensor {name} holds NaN or infinite values: the weights are damaged "
                                "(or a training run diverged); nothing was exported")
        return model

    # -- one file ------------------------------------------------------------------------------------------------
    def _up_to_date(self, kind: str, name: str, file: str, options: dict) -> manifest.Variant | None:
        return self.maker.up_to_date(kind, name, file, options)

    def _produce(self, kind: str, name: str, precision: str, file: str, options: dict, label: str,
                 make: Callable[[Path, Callable[[int, int], None]], dict], total: int | None = None,
                 fmt: str = "onnx") -> tuple[manifest.Variant, bool]:
        """``variants.VariantMaker.make`` with export's progress steps and summary; returns ``(variant, made)``."""
        def build(staged: Path) -> dict:
            with self.progress.step(label, total) as update:
                return make(staged, update)

        v, made = self.maker.make(kind, name, precision, file, options, build, fmt)
        if not made:
            self.log(f"{file}: up to date")
        self.status[file] = "new" if made else "up to date"
        return v, made

    def _write_arrays(self) -> None:
        """The learned vectors the family packs image features with (LLaVA-NeXT's image_newline), as ``.npy``
        files beside the graphs: every vision variant, ONNX or TensorRT, shares them. Unchanged ones are not
        rewritten."""
        import io

        import numpy as np

        arrays = {}
        for name, value in self.ckpt.family.side_arrays(self.ckpt).items():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(value, dtype=np.float32), allow_pickle=False)
            data, file = buf.getvalue(), f"array.{name}.npy"
            dst = self.out / file
            if not (dst.is_file() and dst.read_bytes() == data):
                atomic.write_bytes(dst, data)
            arrays[name] = {"file": file, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.m.arrays = arrays

    def _copy_tokenizer(self) -> None:
        for name in TOKENIZER_FILES:
            src, dst = self.ckpt.path / name, self.out / name
            if src.is_file() and not (dst.is_file() and dst.read_bytes() == src.read_bytes()):
                with atomic.atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)

    # -- the steps -------------------------------------------------------------------------------------------------
    def _fp32_options(self) -> dict:
        return {"exporter": __version__, "opset": OPSET, "max_batch": MAX_BATCH,
                "image_size": self.m.vision["image_size"]}

    def _parity(self, onnx_file: Path, name: str) -> dict:
        pixels = parity_pixels(self.ckpt)
        p = parity_vs_hf(self.model, onnx_file, pixels, self.ckpt.family)
        p = {"against": "huggingface", "images": len(pixels),
             **{k: float(f"{v:.4g}") if k != "min_cosine" else v for k, v in p.items()}}
        self.log(f"vision {name} vs Hugging Face on {len(pixels)} rendered images: min cosine per image token "
                 f"{p['min_cosine']:.8f}, max abs error {p['max_abs']:.3g} (largest value {p['max_ref']:.3g})")
        if name == "fp32" and p["min_cosine"] < FP32_GRAPH_MIN_COSINE:
            self.log(f"warning: the fp32 graph's min cosine {p['min_cosine']:.6f} is below {FP32_GRAPH_MIN_COSINE}")
        return p

    def vision_fp32(self) -> manifest.Variant:
        size = self.m.vision["image_size"]

        def make(staged: Path, _update) -> dict:
            export_vision_onnx(self.model, staged, size)
            return {"quality": self._parity(staged, "fp32")}

        return self._produce("vision", "fp32", "fp32", FP32_ONNX, self._fp32_options(),
                             f"vision tower + projector -> ONNX fp32 (opset {OPSET})", make)[0]

    def vision_fp16(self) -> manifest.Variant:
        fp32 = self.m.variant("vision", "fp32")

        def make(staged: Path, _update) -> dict:
            kept = convert_vision_fp16(self.out / FP32_ONNX, staged)
            return {"fp32_kept": kept, "quality": self._parity(staged, "fp16")}

        return self._produce("vision", "fp16", "fp16", FP16_ONNX, fp16_options(fp32),
                             "vision ONNX fp32 -> fp16 (LayerNorm and Softmax kept in fp32)", make)[0]

    def llm(self) -> manifest.Variant:
        outtype = self.opts.llm_outtype
        dims: dict = {}

        def make(staged: Path, update) -> dict:
            dims.update(export_llm_gguf(self.ckpt, staged, outtype, add_bos=self.adds_bos, progress=update))
            return {}

        v, made = self._produce("llm", outtype, outtype, self._llm_file(),  # the exporter reports the tensor count
                                {"exporter": __version__, "outtype": outtype, "add_bos": self.adds_bos},
                                f"language model -> GGUF {outtype}", make, fmt="gguf")
        if made:
            self.m.llm = {**self.m.llm, **dims, "image_token_id": self.ckpt.image_token_id}
            manifest.write_incomplete(self.out, self.m)
        return v

    def mmproj(self) -> manifest.Variant:
        outtype = self.opts.mmproj_outtype

        def make(staged: Path, _update) -> dict:
            return export_mmproj_gguf(self.ckpt, staged, outtype, log=self.log)

        return self._produce("mmproj", outtype, outtype, f"mmproj.{outtype}.gguf",
                             {"exporter": __version__, "outtype": outtype},
                             f"vision tower + projector -> llama.cpp mmproj GGUF {outtype}", make, fmt="gguf")[0]

    def tensorrt(self) -> manifest.Variant | None:
        from llava_edge.runtimes.tensorrt_vision import running_platform

        o, t = self.opts, self.opts.tensorrt
        precision = o.trt_precision
        onnx = self.m.variant("vision", "fp32")
        cache = self._calibration_cache()
        options = {"exporter": __version__, "precision": precision, "max_batch": t.max_batch,
                   "opt_batch": t.opt_batch, "workspace_mib": t.workspace_mib, "base_sha256": onnx.sha256,
                   "calibration_sha256": manifest.sha256_file(cache) if cache else None, **running_platform()}

        def make(staged: Path, _update) -> dict:
            return build_engine(self.out / FP32_ONNX, staged, precision=precision, max_batch=t.max_batch,
                                opt_batch=t.opt_batch, calibration_cache=cache, timing_cache=self.out / TIMING_CACHE,
                                workspace_mib=t.workspace_mib, log=self.log)

        try:
            return self._produce("vision", f"trt-{precision}", precision, engine_file_name(precision), options,
                                 f"TensorRT {precision} engine from {FP32_ONNX}", make, fmt="tensorrt")[0]
        except UserError as e:
            if o.target != "all":
                raise
            self.log(f"tensorrt: skipped ({e})")
            return None

    # -- the end ------------------------------------------------------------------------------------------------------
    def _summary(self) -> None:
        rows = [(v.kind, v.name, v.precision, manifest.human_size(v.size), v.file, self.status.get(v.file, "kept"))
                for v in self.m.variants]
        head = ("kind", "variant", "precision", "size", "file", "")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        total = sum(v.size for v in self.m.variants)
        self.log(f"bundle {self.out}: {len(rows)} variants, {manifest.human_size(total)}")
        for r in [head, *rows]:
            self.log("  " + "  ".join(c.ljust(w) if i != 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip())
