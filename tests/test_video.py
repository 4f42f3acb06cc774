"""Video questions for LLaVA-OneVision: frames sampled as LLaVA-NeXT's code samples them, features and answers
against transformers' ``LlavaOnevisionForConditionalGeneration.get_video_features`` and its language model.

Videos are written here with PyAV (MPEG-4, the encoder PyAV's wheel carries): each frame a flat grey whose level
is its index, so which frames were taken can be read back despite the lossy codec. transformers' video
processor needs torchvision (absent here), so the reference takes llava-edge's frame pixels (each frame resized
to the tile with PIL's bicubic, as the image processor resizes) and is compared from the tower on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from next_helpers import assert_logits_close, hf_answer, picture, toy_bundle

from llava_edge.errors import UserError
from llava_edge.runtimes.llm import ImageSlot
from llava_edge.video import MAX_FRAMES, Video, read_frames

QUESTION = "What happens in the video?"


def write_video(path, n: int, size=(160, 120), step: int = 10) -> None:
    import av

    with av.open(str(path), mode="w") as out:
        s = out.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n):
            a = np.full((size[1], size[0], 3), (i * step) % 256, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, 25)
    return path


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    return toy_bundle(tmp_path_factory, "toy-onevision", seed=2)


def test_frames_are_sampled_uniformly_first_and_last_included(clip):
    for n in (1, 4, 8, 25):
        frames = read_frames(Video(clip, n))
        levels = [float(np.asarray(f).mean()) for f in frames]
        want = np.linspace(0, 24, n, dtype=int) * 10  # each frame's grey level is 10 x its index (the codec: +-5)
        assert len(frames) == n and np.abs(np.asarray(levels) - want).max() < 5, (n, levels)


def test_bad_videos_get_one_line_errors(clip, tmp_path, monkeypatch):
    from llava_edge import video as video_mod

    def one_line(fn, *args, match):
        with pytest.raises(UserError) as e:
            fn(*args)
        assert "\n" not in str(e.value) and match in str(e.value), str(e.value)

    not_video = tmp_path / "a.mp4"
    not_video.write_bytes(b"this is not a video at all" * 20)
    one_line(read_frames, Video(not_video), match="not a video")
    one_line(read_frames, Video(b"\x00" * 300), match="not a video")
    one_line(read_frames, Video(tmp_path / "missing.mp4"), match="no such video")
    png = tmp_path / "p.png"
    picture(20, 20).save(png)
    still = read_frames(Video(png, 4))  # FFmpeg reads a still picture as a one-frame video: that frame, 4 times
    assert len(still) == 4 and all(np.array_equal(np.asarray(f), np.asarray(still[0])) for f in still)
    for bad in (10_000, 0, -1, 2.5, True):
        one_line(Video, clip, bad, match="--frames")
    monkeypatch.setattr(video_mod, "MAX_FILE_FRAMES", 10)
    one_line(read_frames, Video(clip), match="more than 10 frames")
    monkeypatch.setattr(video_mod, "MAX_VIDEO_BYTES", 100)
    one_line(read_frames, Video(clip), match="limit")
    assert MAX_FRAMES >= 32  # what LLaVA-OneVision was trained with


def test_video_features_and_answer_equal_transformers(onevision, clip):
    from transformers import LlavaOnevisionForConditionalGeneration

    from llava_edge import EdgeLLaVA

    model, bundle = onevision
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(model, attn_implementation="eager").eval()
    m = EdgeLLaVA.load(bundle, device="cpu", kv_cache="f32", threads=1, prefix_cache=False)
    try:
        v = Video(clip, 6)
        prepared = m.prepare_image(v)
        side = m.images.grid.side
        pooled = -(-side // 2)
        assert prepared.video and prepared.tiles == 6 and prepared.positions == 6 * pooled * pooled + 1
        cfg = hf.config
        with torch.no_grad():
            want = hf.model.get_video_features(
                pixel_values_videos=torch.from_numpy(prepared.pixels)[None],
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output[0].numpy()
        _, got = m.image_embeddings(v)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

        s = m.session(v)
        slots = s._fit(QUESTION, [p for p, _ in s._prepared()], 1)
        answer = s.ask(QUESTION, max_tokens=6)
        assert isinstance(answer, str) and s.history[0].videos == 1
        mask = torch.tensor([isinstance(x, ImageSlot) for x in slots])
        ids = torch.tensor([[0 if isinstance(x, ImageSlot) else x for x in slots]])
        with torch.no_grad():
            embeds = hf.get_input_embeddings()(ids).clone()
        embeds[0, mask] = torch.from_numpy(want)
        ref, new = hf_answer(hf, m.eos_id, 6, inputs_embeds=embeds, attention_mask=torch.ones_like(ids))
        m.llm.reset()
        assert_logits_close(m.prefill(slots, {p.key: fn for p, fn in s._prepared()}, logits="all")[-1], ref)
        assert m.last_ids[: len(new)] == new
    finally:
        m.close()


def test_a_video_and_a_picture_in_one_conversation(onevision, clip):
    """A picture beside a video is still the only image: tiled, as transformers' OneVision counts images."""
    from llava_edge import EdgeLLaVA

    _, bundle = onevision
    m = EdgeLLaVA.load(bundle, device="cpu", threads=1, prefix_cache=False)
    try:
        s = m.session([picture(640, 480), Video(clip, 3)])
        s.ask(QUESTION, max_tokens=2)
        prepared = [p for p, _ in s._prepared()]
        assert prepared[0].tiles > 1 and prepared[1].video
        assert s.history[0].image == 2 and s.history[0].videos == 1
    finally:
        m.close()


def test_cli_chat_with_a_video_and_a_family_without_video(onevision, clip, tmp_path_factory):
    from cli_run import assert_one_line_error, le

    _, bundle = onevision
    r = le("chat", "--bundle", bundle, "--video", clip, "--frames", "4", "--explain", "--max-tokens", "3",
           "--device", "cpu", "--no-prefix-cache", QUESTION, block_torch=True)
    assert r.returncode == 0, r.stderr
    assert "a video: 4 frames" in r.stderr
    r = le("chat", "--bundle", bundle, "--video", clip, "--frames", "10000", QUESTION, block_torch=True)
    assert_one_line_error(r, "--frames")
    _, out = toy_bundle(tmp_path_factory, "toy-next")
    r = le("chat", "--bundle", out, "--video", clip, "--device", "cpu", QUESTION, block_torch=True)
    assert_one_line_error(r, "no video")


def test_serve_takes_a_video_url_as_chat_does(onevision, clip, tmp_path):
    """An OpenAI-style `video_url` part (a data: URI, as vLLM takes it) after an image in one message: the answer
    and prompt_tokens equal the runtime's for the same conversation (the picture tiled, the video's --frames)."""
    import base64

    from openai import OpenAI
    from serve_helpers import data_uri, serving

    from llava_edge import EdgeLLaVA
    from llava_edge.runtimes.pipeline import Sampling

    _, bundle = onevision
    img = tmp_path / "p.png"
    picture(300, 200).save(img)
    m = EdgeLLaVA.load(bundle, device="cpu", threads=1, prefix_cache=False)
    try:
        slots, prepared, _ = m.conversation_slots(QUESTION, [str(img), Video(clip.read_bytes(), 3)], [])
        assert prepared[0].tiles > 1 and prepared[1].video and prepared[1].tiles == 3
        want = "".join(m.generate(slots, {p.key: (lambda p=p: m.encode([p])[0]) for p in prepared},
                                  Sampling(max_tokens=6))).strip()
    finally:
        m.close()
    video_uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    with serving(bundle, tmp_path, "--device", "cpu", "--threads", "1", "--no-prefix-cache", "--frames", "3") as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="-")
        content = [{"type": "text", "text": QUESTION}, {"type": "video_url", "video_url": {"url": video_uri}},
                   {"type": "image_url", "image_url": {"url": data_uri(img)}}]  # the image still comes first
        r = c.chat.completions.create(model="b", messages=[{"role": "user", "content": content}], max_tokens=6,
                                      temperature=0)
        assert r.choices[0].message.content.strip() == want and r.usage.prompt_tokens == len(slots)
        bad = [{"type": "text", "text": QUESTION},
               {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(
                   b"not a video" * 30).decode()}}]
        from openai import BadRequestError

        with pytest.raises(BadRequestError) as e:
            c.chat.completions.create(model="b", messages=[{"role": "user", "content": bad}], max_tokens=2)
        assert "not a video" in str(e.value)
