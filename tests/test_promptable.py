"""`qsamc export --promptable`: SAM's prompt encoder + mask decoder as decoder.onnx, in real ORT sessions."""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import randomize_

from qsamc import sam
from qsamc.errors import CheckpointError
from qsamc.export.promptable import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    DecoderSpec,
    build_promptable,
    export_decoder,
    onnx_model,
)
from qsamc.export.ort import ort_session
from qsamc.supernet.space import load_subnet


def _prompt(spec: DecoderSpec, embedding: np.ndarray, points: int, orig=(90, 120)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(points)
    return {"image_embeddings": embedding,
            "point_coords": rng.uniform(0, spec.resolution, (1, points, 2)).astype(np.float32),
            "point_labels": rng.integers(0, 2, (1, points)).astype(np.float32),
            "mask_input": np.zeros((1, 1, 4 * spec.grid, 4 * spec.grid), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(orig, np.float32)}


def _sam_checkpoint(path, spec: DecoderSpec, seed: int = 3, with_decoder: bool = True):
    """A whole-SAM-style checkpoint: image_encoder.* keys (ignored here) and, unless told otherwise,
    seeded random prompt_encoder.* and mask_decoder.* keys."""
    state = {f"image_encoder.{k}": v for k, v in sam.build_encoder("vit_t").state_dict().items()}
    decoder = randomize_(spec.build(), seed)
    if with_decoder:
        state.update(decoder.state_dict())
    torch.save(state, path)
    return decoder


def test_decoder_is_segment_anythings_export_with_dynamic_points():
    spec = DecoderSpec.for_subnet("vit_t", 256)
    model, weights = build_promptable(spec)
    proto, report = export_decoder(spec, model, weights)
    assert "freshly initialised" in report.weights
    assert [i.name for i in proto.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    assert (report.opset, report.ir_version) == (17, 8) and proto.ir_version == 8
    assert report.image_embeddings == [1, 32, 16, 16] and report.mask_input == [1, 1, 64, 64]
    assert report.fidelity.ok and report.fidelity.max_abs_diff < 1e-4
    saved = report.to_json()  # the layout report.json keeps: the fidelity figures beside the shapes
    assert saved["ok"] and saved["max_abs_diff"] == report.fidelity.max_abs_diff and saved["inputs"] == list(INPUT_NAMES)
    # Point counts other than the export's 5, and aspect ratios other than its 2:3, match PyTorch.
    session, wrapper = ort_session(proto), onnx_model(model)
    embedding = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(5)).numpy()
    for points, orig in ((1, (120, 160)), (7, (128, 64))):
        prompt = _prompt(spec, embedding, points, orig)
        masks, iou, low = session.run(None, prompt)
        with torch.no_grad():
            expected = wrapper(**{k: torch.from_numpy(v) for k, v in prompt.items()})
        assert masks.shape == (1, 4, *orig) and iou.shape == (1, 4) and low.shape == (1, 4, 64, 64)
        np.testing.assert_allclose(masks, expected[0].numpy(), atol=1e-4, rtol=0)


def test_a_lower_resolution_subnet_gets_a_smaller_embedding_grid():
    """The grid is resolution // patch; the decoder built for it runs on that grid (exported and chained in
    ORT at vit_t's smallest resolution, 128 -> 8x8, by the export test below)."""
    spec = DecoderSpec.for_subnet("vit_t", 192)
    assert (spec.grid, spec.embed_dim, spec.is_sam) == (12, 32, False)
    assert DecoderSpec.for_subnet("vit_b", 512).grid == 32 and DecoderSpec.for_subnet("vit_b", 1024).is_sam
    model, _ = build_promptable(spec)
    assert tuple(model.prompt_encoder.get_dense_pe().shape) == (1, 32, 12, 12)
    prompt = _prompt(spec, np.zeros((1, 32, 12, 12), np.float32), 2)
    with torch.no_grad():
        masks, _, low = onnx_model(model)(**{k: torch.from_numpy(v) for k, v in prompt.items()})
    assert masks.shape == (1, 4, 90, 120) and low.shape == (1, 4, 48, 48)


def test_a_sam_checkpoint_supplies_the_prompt_encoder_and_mask_decoder(tmp_path):
    spec = DecoderSpec.for_subnet("vit_t", 256)
    saved = _sam_checkpoint(tmp_path / "sam_vit_t.pth", spec)
    model, weights = build_promptable(spec, tmp_path / "sam_vit_t.pth")
    assert weights == f"checkpoint {tmp_path / 'sam_vit_t.pth'}"
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_a_checkpoint_without_prompt_encoder_or_mask_decoder_is_one_sentence(tmp_path):
    spec = DecoderSpec.for_subnet("vit_t", 256)
    path = tmp_path / "encoder_only.pth"
    _sam_checkpoint(path, spec, with_decoder=False)
    with pytest.raises(CheckpointError) as error:
        build_promptable(spec, path)
    assert str(error.value) == (
        f"checkpoint {path} has no prompt encoder or mask decoder weights (no 'prompt_encoder.*' or "
        f"'mask_decoder.*' keys): give a whole SAM checkpoint such as sam_vit_b_01ec64.pth, or leave it out "
        f"for a freshly initialised prompt encoder and mask decoder")
    # A decoder of another width (SAM's 256 channels for a 32-channel vit_t) names the first misfit.
    wide = DecoderSpec.for_subnet("vit_b", 1024)
    torch.save(wide.build().state_dict(), tmp_path / "sam_vit_b.pth")
    with pytest.raises(CheckpointError, match=r"does not fit the 32-channel SAM mask decoder: 'prompt_encoder\."):
        build_promptable(spec, tmp_path / "sam_vit_b.pth")


@pytest.fixture(scope="module")
def run_folder(calibrated_run):
    """The session's calibrated run and its w8a8-min.json: the smallest subnet at W8A8, the fastest to export."""
    return calibrated_run, load_subnet(calibrated_run / "w8a8-min.json")


def test_export_promptable_chains_encoder_onnx_into_decoder_onnx(run_cli, run_folder, tmp_path, monkeypatch, capsys):
    from qsamc import pipeline

    run, subnet = run_folder
    monkeypatch.setattr(pipeline, "export_subnet", functools.partial(pipeline.export_subnet, samples=1))  # speed
    spec = DecoderSpec.for_subnet("vit_t", subnet.resolution)
    _sam_checkpoint(tmp_path / "sam.pth", spec)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("export", "--supernet", run, "--subnet", run / "w8a8-min.json", "--target", "cpu",
                                "--out", out, "--promptable", "--sam-checkpoint", tmp_path / "sam.pth")
    assert code in (0, None), stderr
    assert "decoder.onnx" in stdout
    report = json.loads((out / "report.json").read_text())
    decoder = report["decoder"]
    assert decoder["ok"] and decoder["max_abs_diff"] < 1e-4 and decoder["weights"].startswith("checkpoint ")
    assert report["files"]["decoder"] == str(out / "decoder.onnx")
    # The interactive pipeline: image -> encoder.onnx -> embeddings -> decoder.onnx (+ clicks) -> masks.
    encoder = ort_session(onnx.load(out / "encoder.onnx"))
    decoder_session = ort_session(onnx.load(out / "decoder.onnx"))
    image = np.random.default_rng(0).standard_normal((1, 3, subnet.resolution, subnet.resolution)).astype(np.float32)
    (embedding,) = encoder.run(None, {"image": image})
    assert embedding.shape == (1, 32, spec.grid, spec.grid)
    masks, iou, low = decoder_session.run(None, _prompt(spec, embedding, 3, (96, 128)))
    assert masks.shape == (1, 4, 96, 128) and iou.shape == (1, 4) and low.shape == (1, 4, 4 * spec.grid, 4 * spec.grid)
    assert np.isfinite(masks).all()


@pytest.mark.parametrize("case", ["encoder-only checkpoint", "checkpoint without --promptable"])
def test_export_promptable_user_errors_are_one_sentence_and_write_nothing(run_cli, case, run_folder, tmp_path, monkeypatch, capsys):
    run, _ = run_folder
    checkpoint = tmp_path / "encoder_only.pth"
    _sam_checkpoint(checkpoint, DecoderSpec.for_subnet("vit_t", 256), with_decoder=False)
    flags = ["--promptable"] if case == "encoder-only checkpoint" else []
    out = tmp_path / "out"
    code, _, stderr = run_cli("export", "--supernet", run, "--subnet", run / "w8a8-min.json", "--target", "cpu",
                           "--out", out, *flags, "--sam-checkpoint", checkpoint)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1
    assert ("no prompt encoder or mask decoder weights" in stderr) == bool(flags)
    assert not out.exists()
