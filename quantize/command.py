"""``llava-edge quantize``: add quantized variants of a bundle's language model and vision graph.

    llava-edge quantize BUNDLE --llm q8_0,q4_k_m --vision fp16,int8,int8-static,int4

Each variant becomes a file of the bundle registered in ``manifest.json``
(name as the user passes it, kind, precision, size, sha256) together with the
parameters that made it (``params``: type, the base file's sha256, block size,
calibration fingerprint, fusion). The order of operations keeps the bundle
consistent whatever happens:

1. A variant whose registered file still has its sha256 and whose ``params``
   equal the requested ones is up to date: nothing is redone.
2. A registered variant that must be redone is first unregistered (manifest
   written), so no entry ever describes a file being rewritten.
3. The file is written under a temporary name and renamed when complete.
4. It is registered and the manifest written (atomically). If that write
   fails, the new file is removed.

A kill leaves at most a hidden ``.partial`` temporary, removed by the next
run; a full disk fails the variant with a one-line error and leaves the bundle
as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_edge import atomic, bundle_lock, manifest
from llava_edge.errors import UserError, describe_os_error
from llava_edge.preprocess import ImageSpec
from llava_edge.quality import VISION_VARIANT_MIN_COSINE
from llava_edge.variants import VariantMaker

from . import llm as llm_quant
from . import vision as vision_quant

CHECK_IMAGES = 8  # images the vision variants are compared on against fp32


@dataclass
class Outcome:
    """One requested variant: made now, or already up to date."""

    kind: str
    name: str
    file: str
    size: int
    made: bool
    note: str = ""


def parse_types(text: str | Sequence[str] | None, valid: Sequence[str], option: str) -> list[str]:
    """``"q8_0, Q4_K_M"`` -> ``["q8_0", "q4_k_m"]``, in order, without repeats; unknown names list the valid ones."""
    if text is None:
        return []
    parts = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    out: list[str] = []
    for raw in parts:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in valid:
            raise UserError(f"unknown {option} type {raw.strip()!r}; valid: {', '.join(valid)}")
        if name not in out:
            out.append(name)
    return out


def quantize_bundle(
    bundle: str | Path,
    llm: str | Sequence[str] | None = None,
    vision: str | Sequence[str] | None = None,
    *,
    calib_images: str | Path | None = None,
    calib_count: int = vision_quant.DEFAULT_CALIB_COUNT,
    threads: int = 0,
    block_size: int = vision_quant.DEFAULT_BLOCK_SIZE,
    optimize: bool | None = None,
    trt_calib_cache: bool = False,
    image_tokens: str | None = None,
    token_method: str = "pool",
    projector: str | Path | None = None,
    wait: bool = True,
    log: Callable[[str], None] = print,
) -> list[Outcome]:
    """Make (or find up to date) every requested variant of ``bundle``; see the module docstring.

    ``image_tokens`` (``"144,64"``): the vision types are made for each of these token counts and each of
    ``token_method``'s methods (``"pool,dominant"``), as reduced-token variants named ``TYPE-METHODK``
    (``int8-pool144``; the type ``fp32`` is the reduced float graph itself, the default type); a count equal
    to the full grid is the ordinary variant. ``projector``: a projector fine-tuned for the reduction
    (``train stage2 --image-tokens K --tune projector``) replaces the graph's; the names end in ``-tuned``.
    ``optimize``: fuse the vision graph for onnxruntime before quantizing (None: int8 and int4 fused, the
    others not; see :func:`llava_edge.quantize.vision.fuses`).
    """
    bundle = Path(bundle)
    llm_types = parse_types(llm, tuple(llm_quant.LLM_TYPES), "--llm")
    reduced_types = ("fp32",) + vision_quant.VISION_TYPES
    vision_types = parse_types(vision, reduced_types if image_tokens else vision_quant.VISION_TYPES, "--vision")
    if image_tokens and not vision_types:
        vision_types = ["fp32"]
    if projector is not None and not image_tokens:
        raise UserError("--projector replaces the projector of reduced-token variants: pass --image-tokens K too")
    if not (llm_types or vision_types or trt_calib_cache):
        raise UserError("nothing to quantize: pass --llm TYPES and/or --vision TYPES (or --trt-calib-cache)")
    vision_quant.check_block_size(block_size)
    if calib_count < 1:
        raise UserError("--calib-count must be at least 1")
    if threads < 0:
        raise UserError("--threads must be 0 (all cores) or more")
    if calib_images is not None and not Path(calib_images).is_dir():
        raise UserError(f"--calib-images {calib_images} is not a directory")
    if not manifest.is_bundle(bundle):
        manifest.read(bundle)  # the one-line error for what it is instead
    with bundle_lock.writing(bundle, wait=wait, log=log):  # read-modify-write of the manifest, one writer at a time
        m = manifest.read(bundle)
        reductions = _reductions(m, image_tokens, token_method) if image_tokens else [None]
        if projector is not None and None in reductions:
            raise UserError("--projector is for reduced-token variants; drop the full token count from --image-tokens")
        llm_base = _llm_base(bundle, m) if llm_types else None
        vision_base = _vision_base(bundle, m) if (vision_types or trt_calib_cache) else None
        if trt_calib_cache:
            from llava_edge.runtimes.tensorrt_vision import import_tensorrt

            try:
                import_tensorrt()
            except UserError as e:
                raise UserError(f"--trt-calib-cache needs TensorRT on this machine: {e}") from None
        atomic.remove_partials(bundle)

        job = _Job(bundle, m, log)
        job.vision_base = vision_base
        for t in llm_types:
            job.llm_variant(t, llm_base, threads)
        if vision_types or trt_calib_cache:
            job.spec = ImageSpec.from_dict(m.image)
            job.calib_dir, job.calib_count = calib_images, calib_count
            for r in reductions:
                for t in vision_types:
                    if r is None:
                        if t != "fp32":  # the full fp32 graph is the export's
                            job.vision_variant(t, vision_base, block_size, optimize)
                    else:
                        job.reduced_variant(t, r, vision_base, block_size, optimize, projector)
            if trt_calib_cache:
                job.tensorrt_calibration(vision_base)
        return job.outcomes


def _reductions(m: manifest.Manifest, image_tokens: str, token_method: str) -> list:
    """``--image-tokens`` x ``--token-method`` -> reductions (None for the full grid), checked against the graph."""
    from llava_edge import families
    from llava_edge import image_tokens as it

    family = families.by_name(m.family)
    if family.caps_positions:
        raise UserError(f"this bundle is {family.title}: its pictures take a varying number of positions, capped at "
                        "run time with every vision variant (chat, serve, drift --image-tokens K); quantize "
                        "--image-tokens makes reduced variants of one-tile models")
    if not family.reduces_tokens:
        raise UserError(f"--image-tokens makes reduced variants of one-tile models; this bundle is {family.title}")
    v = m.vision
    if v.get("select_strategy", "default") != "default":
        raise UserError(f"token reduction needs LLaVA's 'default' feature selection; this bundle's is "
                        f"{v.get('select_strategy')!r}")
    grid = int(v["image_size"]) // int(v["patch_size"])
    if grid * grid != int(v["num_image_tokens"]):
        raise UserError(f"the bundle's {v['num_image_tokens']} image tokens are not a {grid}x{grid} patch grid")
    out = []
    for k in it.parse_tokens(image_tokens):
        if k == grid * grid:
            out.append(None)
            continue
        for method in it.parse_methods(token_method):
            out.append(it.plan(method, k, grid))
    return list(dict.fromkeys(out))


def _llm_base(bundle: Path, m: manifest.Manifest) -> manifest.Variant:
    bases = m.find("llm", precisions=tuple(llm_quant.BASE_PRECISIONS))
    if not bases:
        have = ", ".join(v.name for v in m.find("llm")) or "none"
        raise UserError(f"the bundle has no f32/bf16/f16 GGUF to quantize from (it has: {have}); export one first: "
                        f"llava-edge export --model MODEL --out {bundle} --target gguf --llm-outtype f16")
    base = min(bases, key=lambda v: llm_quant.BASE_PRECISIONS.index(v.precision))
    manifest.check_files(bundle, m, [base.file])
    return base


def _vision_base(bundle: Path, m: manifest.Manifest) -> manifest.Variant:
    bases = [v for v in m.find("vision", precisions=("fp32",), fmt="onnx") if v.token_reduction is None]
    if not bases:
        raise UserError("the bundle has no fp32 vision ONNX to quantize from; export one first: "
                        f"llava-edge export --model MODEL --out {bundle} --target onnx")
    manifest.check_files(bundle, m, [bases[0].file])
    return bases[0]


class _Job:
    """One run: the manifest in memory, written after every variant; calibration pixels loaded once."""

    def __init__(self, bundle: Path, m: manifest.Manifest, log: Callable[[str], None]):
        self.bundle, self.m, self.log = bundle, m, log
        self.maker = VariantMaker(bundle, m, manifest.write, log)
        self.outcomes: list[Outcome] = []
        self.spec: ImageSpec | None = None
        self.calib_dir: str | Path | None = None
        self.calib_count = vision_quant.DEFAULT_CALIB_COUNT
        self._calib: tuple[np.ndarray, str, str] | None = None
        self._check: tuple[np.ndarray, str] | None = None
        self._graphs: dict[bool, tuple[object, dict]] = {}
        self.vision_base: manifest.Variant | None = None
        self._reduced: dict[tuple, object] = {}  # (reduction, projector) -> the spliced fp32 graph
        self._projectors: dict[tuple, tuple[dict, str]] = {}  # (reduction, projector) -> (weights, sha256)

    # -- the bookkeeping every variant shares ---------------------------------------------------------------
    def _produce(self, kind: str, name: str, precision: str, file: str, options: dict, label: str,
                 make: Callable[[Path], dict]) -> manifest.Variant | None:
        """``variants.VariantMaker.make``, with quantize's outcome list and log; None when up to date."""
        before = self.maker.up_to_date(kind, name, file, options)
        if before is not None:
            self.outcomes.append(Outcome(kind, name, file, before.size, made=False, note="up to date"))
            self.log(f"{kind} {name}: up to date ({file})")
            return None
        self.log(f"{kind} {name}: {label}")
        try:
            v, _ = self.maker.make(kind, name, precision, file, options, make, "gguf" if kind == "llm" else "onnx")
        except OSError as e:
            raise UserError(f"could not write {file} into {self.bundle}: {_os_error(e)}") from None
        self.outcomes.append(Outcome(kind, name, file, v.size, made=True))
        return v

    # -- the language model ---------------------------------------------------------------------------------
    def llm_variant(self, type_name: str, base: manifest.Variant, threads: int) -> None:
        options = {"type": type_name, "base": base.file, "base_sha256": base.sha256}
        src = manifest.bundle_file(self.bundle, base.file)
        v = self._produce("llm", type_name, type_name, llm_quant.llm_file_name(type_name), options,
                          f"llama.cpp quantizes {base.file}",
                          lambda path: llm_quant.quantize_gguf(src, path, type_name, threads))
        if v is not None:
            fallback = v.extra["fallback_tensors"]
            note = f"{fallback} of {v.extra['tensors']} tensors fell back to other types" if fallback else ""
            self.outcomes[-1].note = note
            self.log(f"llm {type_name}: {v.size / 1e6:.2f} MB ({v.size / base.size:.2f}x of {base.name}) "
                     f"{v.extra['tensor_types']}{'; ' + note if note else ''}")

    # -- the vision graph -----------------------------------------------------------------------------------
    def calibration(self) -> tuple[np.ndarray, str, str]:
        """(pixels, where from, sha256 of the pixels): what int8-static and TensorRT calibrate on."""
        if self._calib is None:
            if self.calib_dir is None and not self.m.source.get("toy"):
                raise UserError("int8-static and TensorRT calibration need images like the ones the model will see: "
                                "pass --calib-images DIR (synthetic scenes are the default only for the toy models)")
            pixels, source = vision_quant.calibration_pixels(self.spec, self.calib_dir, self.calib_count, seed=0)
            if self.calib_dir is None:
                self.log(f"calibrating on {len(pixels)} synthetic scenes (a toy model's own kind of picture)")
            digest = hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()
            self._calib = (pixels, source, digest)
        return self._calib

    def check_pixels(self) -> tuple[np.ndarray, str]:
        """Images the variants are compared to fp32 on: held-out synthetic scenes, or the user's calibration images."""
        if self._check is None:
            if self.calib_dir is None:
                pixels, _ = vision_quant.calibration_pixels(self.spec, None, CHECK_IMAGES, seed=1)
                self._check = (pixels, "synthetic scenes not used for calibration")
            else:
                self._check = (self.calibration()[0][:CHECK_IMAGES], "the calibration images")
        return self._check

    def graph(self, optimize: bool):
        """A fresh copy of the fp32 graph (fused when ``optimize``) for one quantizer to consume."""
        import onnx

        if optimize not in self._graphs:
            model = onnx.load(str(manifest.bundle_file(self.bundle, self.vision_base.file)))
            stats = {}
            if optimize:
                model, stats = vision_quant.optimize_tower(model)
                self.log(f"vision: fused for onnxruntime: {stats}")
            self._graphs[optimize] = (model, stats)
        model, stats = self._graphs[optimize]
        return onnx.ModelProto.FromString(model.SerializeToString()), stats

    def vision_variant(self, name: str, base: manifest.Variant, block_size: int, optimize: bool) -> None:
        src = manifest.bundle_file(self.bundle, base.file)
        fused = vision_quant.fuses(name, optimize)
        if name == "fp16":  # the same file `export --dtype fp16` makes, with the same options
            from llava_edge.export.vision_fp16 import fp16_options

            options = fp16_options(base)
        else:
            options = {"type": name, "base_sha256": base.sha256, "optimize": vision_quant.FUSION if fused else None}
        if name == "int4":
            options["block_size"] = block_size
        if name == "int8-static":
            options["calibration"] = self.calibration()[2]

        def make(path: Path) -> dict:
            if name == "fp16":
                from llava_edge.export.vision_fp16 import convert_vision_fp16

                record = {"method": "fp16, LayerNorm/Softmax in fp32", **convert_vision_fp16(src, path)}
            else:
                model, stats = self.graph(fused)
                if name == "int8":
                    record = vision_quant.quantize_int8_dynamic(model, path)
                elif name == "int8-static":
                    pixels, source, _ = self.calibration()
                    record = {**vision_quant.quantize_int8_static(model, path, pixels), "calibrated_on": source}
                else:
                    record = vision_quant.quantize_int4(model, path, block_size)
                if fused:
                    record["fused"] = stats
            pixels, where = self.check_pixels()
            cos = vision_quant.compare_to_reference(src, path, pixels)  # also proves it loads and runs
            return {**record, "quality": {"against": "fp32", **cos, "on": where}}

        v = self._produce("vision", name, vision_quant.PRECISION[name], vision_quant.vision_file_name(name),
                          options, f"from {base.file}{' (fused)' if fused else ''}", make)
        if v is not None:
            c = v.extra["quality"]
            self.outcomes[-1].note = f"cosine vs fp32: min {c['min_cosine']:.4f}, mean {c['mean_cosine']:.4f}"
            self.log(f"vision {name}: {v.size / 1e6:.2f} MB ({v.size / base.size:.2f}x of fp32), "
                     f"{self.outcomes[-1].note} on {c['images']} {c['on']}")
            if c["min_cosine"] < VISION_VARIANT_MIN_COSINE:
                self.log(f"warning: vision {name} moves some image tokens far from fp32 "
                         f"(worst cosine {c['min_cosine']:.4f}); check answers with it before using it")

    # -- reduced image tokens ---------------------------------------------------------------------------------
    def reduction_options(self, r, projector: str | Path | None) -> tuple[dict, dict | None]:
        """(what a reduced graph is made from, the tuned projector's weights or None); the projector read once."""
        from llava_edge.image_tokens import read_projector

        made = {"reduction": r.to_dict(), "base_sha256": self.vision_base.sha256}
        if projector is None:
            return made, None
        if (r, str(projector)) not in self._projectors:
            self._projectors[(r, str(projector))] = read_projector(projector, r)
        weights, made["projector_sha256"] = self._projectors[(r, str(projector))]
        return made, weights

    def reduced_graph(self, r, projector: str | Path | None):
        """A fresh copy of the fp32 graph with ``r`` spliced in (spliced once a run, only when a variant is made)."""
        import onnx

        from . import image_tokens as splice

        key = (r, str(projector))
        if key not in self._reduced:
            model, _ = self.graph(False)
            self._reduced[key] = splice.splice(model, r, self.reduction_options(r, projector)[1])
        return onnx.ModelProto.FromString(self._reduced[key].SerializeToString())

    def reduced_variant(self, name: str, r, base: manifest.Variant, block_size: int, optimize: bool,
                        projector: str | Path | None) -> None:
        """``name`` (fp32, fp16, int8, ...) of the vision graph reduced by ``r``: ``int8-pool144[-tuned]``."""
        from llava_edge.export.vision_fp16 import save_onnx, to_fp16

        full_name = f"{name}-{r.label}" + ("-tuned" if projector is not None else "")
        fused = vision_quant.fuses(name, optimize)
        made, _ = self.reduction_options(r, projector)
        options = {**made, "type": name, "optimize": vision_quant.FUSION if fused else None}
        if name == "int4":
            options["block_size"] = block_size
        if name == "int8-static":
            options["calibration"] = self.calibration()[2]

        def make(path: Path) -> dict:
            model = self.reduced_graph(r, projector)
            record: dict = {"type": name, "image_tokens": r.tokens, "token_reduction": r.to_dict()}
            if projector is not None:
                record["projector"] = {"from": str(Path(projector).resolve()), "sha256": made["projector_sha256"]}
            if name == "fp32":
                save_onnx(model, path)
            elif name == "fp16":
                fp16, kept = to_fp16(model)
                save_onnx(fp16, path)
                record.update(method="fp16, LayerNorm/Softmax in fp32", **kept)
            else:
                stats = {}
                if fused:
                    model, stats = vision_quant.optimize_tower(model)
                if name == "int8":
                    record.update(vision_quant.quantize_int8_dynamic(model, path))
                elif name == "int8-static":
                    pixels, source, _ = self.calibration()
                    record.update(vision_quant.quantize_int8_static(model, path, pixels), calibrated_on=source)
                else:
                    record.update(vision_quant.quantize_int4(model, path, block_size))
                if fused:
                    record["fused"] = stats
            pixels, where = self.check_pixels()
            if name == "fp32":
                got = vision_quant.run_graph(path, pixels)
                if got.shape[1] != r.tokens or not np.isfinite(got).all():
                    raise UserError(f"the reduced graph gives {got.shape[1]} tokens (finite: "
                                    f"{bool(np.isfinite(got).all())}), not {r.tokens}")
                record["quality"] = {"against": "none", "images": int(len(pixels)), "on": where,
                                     "checked": "runs, gives the reduced token count, finite"}
            else:
                with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                    ref = Path(tmp) / "reference.onnx"
                    save_onnx(self.reduced_graph(r, projector), ref)
                    cos = vision_quant.compare_to_reference(ref, path, pixels)
                record["quality"] = {"against": "fp32", "reference": f"fp32-{r.label}", **cos, "on": where}
            return record

        precision = "fp32" if name == "fp32" else vision_quant.PRECISION[name]
        v = self._produce("vision", full_name, precision, vision_quant.vision_file_name(full_name), options,
                          f"{r.tokens} image tokens by {r.method} ({_describe(r)}) from {base.file}"
                          + (f", projector {projector}" if projector is not None else ""), make)
        if v is not None:
            self.log(f"vision {full_name}: {v.size / 1e6:.2f} MB, {r.tokens} image tokens of {r.full}")

    # -- TensorRT's INT8 calibration cache --------------------------------------------------------------------
    def tensorrt_calibration(self, base: manifest.Variant) -> None:
        """``tensorrt.int8.calib``, read by ``export --target tensorrt --int8``.

        Not a variant of the manifest (it is no model); what made it is kept beside
        it in ``tensorrt.int8.calib.json`` so a re-run with the same images skips it.
        """
        from llava_edge.export import tensorrt_engine

        pixels, source, digest = self.calibration()
        params = {"base_sha256": base.sha256, "calibration": digest}
        file = tensorrt_engine.CALIBRATION_CACHE
        path, record_path = self.bundle / file, self.bundle / (file + ".json")
        if path.is_file() and record_path.is_file():
            try:
                rec = json.loads(record_path.read_text())
            except ValueError:
                rec = {}
            if rec.get("options") == params and rec.get("sha256") == manifest.sha256_file(path):
                self.outcomes.append(Outcome("tensorrt", "int8-calibration", file, path.stat().st_size, made=False,
                                            note="up to date"))
                self.log(f"tensorrt int8-calibration: up to date ({file})")
                return
        self.log(f"tensorrt int8-calibration: TensorRT calibrates on {len(pixels)} images")
        record_path.unlink(missing_ok=True)  # the cache is about to change
        try:
            # TensorRT writes the cache while it builds an INT8 engine; this engine is thrown away
            # (`export --target tensorrt --int8` builds the real one on the device, reading the cache).
            with tempfile.TemporaryDirectory(dir=self.bundle, prefix=".trt-calib.", suffix=atomic.TMP_SUFFIX) as tmp:
                cache = Path(tmp) / file
                tensorrt_engine.build_engine(manifest.bundle_file(self.bundle, base.file), Path(tmp) / "calibration.engine",
                                             precision="int8", calibration_images=pixels, calibration_cache=cache,
                                             log=self.log)
                if not cache.is_file():
                    raise UserError("TensorRT built the INT8 engine but wrote no calibration cache")
                os.replace(cache, path)
            atomic.write_json(record_path, {"options": params, "sha256": manifest.sha256_file(path),
                                            "calibrated_on": source})
        except OSError as e:
            raise UserError(f"could not write {path}: {_os_error(e)}") from None
        self.outcomes.append(Outcome("tensorrt", "int8-calibration", file, path.stat().st_size, made=True))


def _describe(r) -> str:
    if r.method == "pool":
        return f"{r.grid}x{r.grid} averaged to {r.pool[0]}x{r.pool[1]}"
    return f"{r.dominant} dominant + {r.contextual} contextual"


def _os_error(e: OSError) -> str:
    return describe_os_error(e)
