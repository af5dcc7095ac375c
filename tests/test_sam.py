"""The SAM model zoo, the torchvision-free import and checkpoint loading (qsamc.sam)."""

import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from qsamc import sam
from qsamc.errors import CheckpointError, ConfigError

# Makes `import torchvision` fail in a fresh interpreter, whether or not torchvision is installed.
BLOCK_TORCHVISION = textwrap.dedent("""
    import sys
    class _NoTorchvision:
        def find_spec(self, name, path=None, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                raise ImportError("torchvision is blocked in this test")
            return None
    sys.meta_path.insert(0, _NoTorchvision())
    try:
        import torchvision
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker did not block torchvision")
""")


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCHVISION + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_import_without_torchvision_builds_an_encoder():
    result = run_blocked("""
        import torch
        import qsamc.sam
        encoder = qsamc.sam.build_encoder("vit_t")
        out = encoder(torch.zeros(1, 3, 256, 256))
        assert "torchvision" not in sys.modules
        print(type(encoder).__name__, tuple(out.shape))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ImageEncoderViT (1, 32, 16, 16)"


def test_plain_segment_anything_import_needs_torchvision():
    # Proves the test above is meaningful: without qsamc's workaround the package import fails.
    result = run_blocked("import segment_anything")
    assert result.returncode != 0
    assert "torchvision" in result.stderr


# --- model zoo ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_zoo_configs_equal_segment_anything_builders(name):
    from segment_anything.build_sam import sam_model_registry

    with torch.device("meta"):
        theirs = sam_model_registry[name]().image_encoder
        ours = sam.build_encoder(name)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert list(ours_shapes) == list(theirs_shapes)
    assert ours_shapes == theirs_shapes
    assert ours.img_size == theirs.img_size == 1024
    assert ours.patch_embed.proj.kernel_size == theirs.patch_embed.proj.kernel_size == (16, 16)
    assert ours.neck[0].out_channels == theirs.neck[0].out_channels == 256
    for mine, other in zip(ours.blocks, theirs.blocks, strict=True):
        assert mine.window_size == other.window_size
        assert mine.attn.num_heads == other.attn.num_heads
        assert mine.norm1.eps == other.norm1.eps == 1e-6
        assert mine.attn.use_rel_pos and other.attn.use_rel_pos
    cfg = sam.get_config(name)
    assert [i for i, b in enumerate(theirs.blocks) if b.window_size == 0] == list(cfg.global_attn_indexes)
    assert {b.window_size for b in theirs.blocks} == {0, 14}


@pytest.mark.parametrize("name, stages, size", [("vit_b", 4, 3), ("vit_l", 4, 6), ("vit_h", 4, 8), ("vit_t", 4, 3)])
def test_stages(name, stages, size):
    cfg = sam.get_config(name)
    assert len(cfg.stages) == stages
    assert all(len(s) == size for s in cfg.stages)
    assert [s[-1] for s in cfg.stages] == list(cfg.global_attn_indexes)
    assert sum(cfg.stages, ()) == tuple(range(cfg.depth))


def test_vit_t_is_small():
    """The embedded config stays tiny: under 1M parameters and 0.25 GMAC per 256px image (counted, not
    timed; the CPU forward time is a benchmark's business)."""
    from torch.utils.flop_counter import FlopCounterMode

    encoder = sam.build_encoder("vit_t")
    assert sum(p.numel() for p in encoder.parameters()) < 1_000_000
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = encoder(torch.zeros(1, 3, 256, 256))
    assert out.shape == (1, 32, 16, 16)
    assert counter.get_total_flops() // 2 < 250_000_000


def test_unknown_model():
    with pytest.raises(ConfigError, match=r"^unknown model 'vit_x'; known models are vit_b, vit_h, vit_l, vit_t$"):
        sam.get_config("vit_x")


# --- checkpoints ----------------------------------------------------------------------------------

@pytest.fixture
def vit_t_state():
    torch.manual_seed(0)
    encoder = sam.build_encoder("vit_t")
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0.0, 0.2)
    return encoder, encoder.state_dict()


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.strip() == message and len(message) > 0


def test_whole_sam_checkpoint_loads(tmp_path, vit_t_state):
    encoder, state = vit_t_state
    whole = {f"image_encoder.{k}": v for k, v in state.items()}
    whole["prompt_encoder.point_embeddings.0.weight"] = torch.ones(1, 32)
    whole["mask_decoder.iou_token.weight"] = torch.ones(1, 32)
    path = tmp_path / "sam_vit_t.pth"
    torch.save(whole, path)
    loaded = sam.build_encoder("vit_t", path)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder.eval()(x))
    assert sam.read_state_dict(path).keys() == state.keys()


def test_bare_encoder_checkpoint_loads(tmp_path, vit_t_state):
    encoder, state = vit_t_state
    path = tmp_path / "encoder.pth"
    torch.save(state, path)
    loaded = sam.build_encoder("vit_t", path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_checkpoint_of_another_architecture_names_key_and_shapes(tmp_path, vit_t_state):
    _, state = vit_t_state
    state = dict(state)
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3 * 768, 768)  # vit_b's shape
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        sam.build_encoder("vit_t", path)
    message = str(info.value)
    assert one_sentence(message)
    assert message == (f"checkpoint {path} does not fit vit_t: 'blocks.0.attn.qkv.weight' has shape "
                       "(2304, 768) in the checkpoint but (192, 64) in the model")


def test_checkpoint_missing_and_extra_keys(tmp_path, vit_t_state):
    _, state = vit_t_state
    missing = {k: v for k, v in state.items() if k != "neck.3.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"key 'neck\.3\.bias' is missing$"):
        sam.build_encoder("vit_t", tmp_path / "missing.pth")
    extra = {**state, "blocks.12.norm1.weight": torch.ones(64)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key 'blocks\.12\.norm1\.weight'$"):
        sam.build_encoder("vit_t", tmp_path / "extra.pth")


def test_truncated_checkpoint(tmp_path, vit_t_state):
    _, state = vit_t_state
    path = tmp_path / "truncated.pth"
    torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        sam.build_encoder("vit_t", path)
    assert one_sentence(str(info.value))
    assert str(info.value).startswith(f"checkpoint {path} is truncated or corrupt")


def test_checkpoint_holding_a_list(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2), torch.ones(2)], path)
    with pytest.raises(CheckpointError, match=r"^checkpoint .*list\.pth holds a list, not a state dict$"):
        sam.build_encoder("vit_t", path)


def test_checkpoint_with_non_tensor_entry(tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"pos_embed": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match=r"entry 'epoch' is not a tensor$"):
        sam.read_state_dict(path)


class Payload:
    """An arbitrary class: unpickling it would run code, so weights_only must refuse it."""

    def __init__(self):
        self.tensor = torch.zeros(2)


def test_checkpoint_pickling_an_arbitrary_class_is_refused(tmp_path):
    path = tmp_path / "code.pth"
    torch.save({"pos_embed": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):  # proves the file really needs a non-weights load
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError) as info:
        sam.build_encoder("vit_t", path)
    assert str(info.value) == (
        f"checkpoint {path} holds something other than tensors, which qsamc never loads from an untrusted file "
        f"(Unsupported global: GLOBAL {__name__}.Payload was not an allowed global by default)")


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is not a PyTorch checkpoint file (neither a torch.save archive nor a pickle)"),
    (b"not a checkpoint but a text file\n", "is not a PyTorch checkpoint file (neither a torch.save archive nor a pickle)"),
    (b"\x80\x02garbage", "holds something other than tensors, which qsamc never loads from an untrusted file "
                         "(Unsupported operand 103)"),
])
def test_checkpoint_that_is_not_a_torch_file(tmp_path, content, message):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        sam.read_state_dict(path)
    assert one_sentence(str(info.value))
    assert str(info.value) == f"checkpoint {path} {message}"


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=r"^checkpoint .*nope\.pth does not exist$"):
        sam.build_encoder("vit_t", path)


def test_unreadable_checkpoints_are_one_sentence_naming_the_file_and_the_fault(tmp_path):
    import os
    import pickle

    from qsamc.errors import CheckpointError
    from qsamc.sam import read_tensors

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo never",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil(), protocol=2))
    torch.save({"a": torch.zeros(3)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("hello\n")
    (tmp_path / "folder.pt").mkdir()
    expected = {
        "evil.pt": "holds something other than tensors, which qsamc never loads from an untrusted file (",
        "cut.pt": "is truncated or corrupt: its zip archive has no central directory",
        "text.pt": "is not a PyTorch checkpoint file (neither a torch.save archive nor a pickle)",
        "folder.pt": "is a folder, not a checkpoint file",
    }
    for name, message in expected.items():
        with pytest.raises(CheckpointError) as error:
            read_tensors(tmp_path / name)
        text = str(error.value)
        assert text.startswith(f"checkpoint {tmp_path / name} {message}") and "\n" not in text
        assert "weights_only=False" not in text
    with pytest.raises(CheckpointError, match=r"\(unsupported GLOBAL posix.system whose module posix is blocked\)$"):
        read_tensors(tmp_path / "evil.pt")
