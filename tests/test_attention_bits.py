"""Attention precision as a searched dimension (beyond the paper): the space, BitOPs, training's LSQ
quantizers on q, k, v and the softmax output, the lowered Q/DQ attention in ONNX Runtime and on TensorRT
targets, and the latency tables' INT8-attention entries."""

import dataclasses
import random
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from qsamc.errors import SubnetError
from qsamc.export.emit import emit_onnx
from qsamc.export.ort import ort_session
from qsamc.export.verify import lint_tensorrt
from qsamc.formats import TENSORRT_MHA, AttentionRule
from qsamc.export.parts import lowered_subnet, part_onnx
from qsamc.ir.frontend import analysis_ir
from qsamc.passes import BitopsModel, CalibrateActivationsPass, CountBitopsPass
from qsamc.passes.count_bitops import attention_macs
from qsamc.search.latency_table import PartKeys, TableLatency
from qsamc.supernet.quant import LsqSymmetricActQuantizer
from qsamc.supernet.space import Subnet, default_space
from qsamc.targets import get_target
from qsamc.training.runs import SupernetSpec, build_model

CPU, A100 = get_target("cpu"), get_target("a100")
SPACE = default_space("vit_t", attention_bits=(8, 32))


# --- the space ----------------------------------------------------------------------------------------

def test_attention_precision_is_off_by_default_and_the_papers_space_is_unchanged():
    paper = default_space("vit_t")
    assert paper.attention_bits == (32,) and not paper.quantized_attention and paper.attention_groups() == {}
    subnet = paper.sample(random.Random(3))
    assert subnet.attention == () and "attention" not in subnet.to_json()
    assert all(subnet.attention_of(b) == 32 for b in range(12))
    # the same draws as before the dimension existed: attention is drawn last, and only where it is a choice
    searched = SPACE.sample(random.Random(3))
    assert replace(searched, attention=()) == subnet and len(searched.attention) == 12


@pytest.mark.parametrize("granularity, groups", [("layer", 12), ("block", 12), ("stage", 4), ("model", 1)])
def test_attention_bits_follow_the_granularity_and_count_exactly(granularity, groups):
    space = default_space("vit_t", granularity, (8, 32))
    assert len(space.attention_groups()) == groups
    narrow = space.restrict(resolutions=(256,), depth_choices=((3,), (3,), (2, 3), (3,)), mlp_ratios=(4.0,),
                            weight_bits=(8,), act_bits=(8,))
    # depth 2 in stage 2 drops one block: its attention is no choice then (block granularities)
    live = {"layer": (12, 11), "block": (12, 11), "stage": (4, 4), "model": (1, 1)}[granularity]
    assert narrow.count() == 2 ** live[0] + 2 ** live[1]
    subnet = space.sample(random.Random(0))
    assert space.validate(Subnet.from_json(subnet.to_json())) == subnet
    for blocks in space.attention_groups().values():
        assert len({subnet.attention[b] for b in blocks}) == 1


def test_malformed_attention_bits_are_one_sentence():
    subnet = SPACE.max_subnet()
    with pytest.raises(SubnetError, match=r"^attention\[3\] = 4 is not one of \[8, 32\]$"):
        SPACE.validate(replace(subnet, attention=(32, 32, 32, 4) + (32,) * 8))
    with pytest.raises(SubnetError, match=r"^attention has 2 entries; vit_t has 12 blocks$"):
        SPACE.validate(replace(subnet, attention=(8, 8)))
    with pytest.raises(SubnetError, match=r"^subnet sets attention bits, but attention is float in this space$"):
        default_space("vit_t").validate(replace(subnet, attention=(8,) * 12))
    stage = default_space("vit_t", "stage", (8, 32))
    with pytest.raises(SubnetError, match=r"^attention\[1\] = 8 differs from attention\[0\] = 32, but attention bits "
                                          r"are tied per stage$"):
        stage.validate(replace(stage.max_subnet(), attention=(32, 8) + (32,) * 10))
    with pytest.raises(SubnetError, match=r"attention_bits must be drawn from \[8, 32\], got \[4, 32\]"):
        default_space("vit_t", attention_bits=(4, 32))


def test_dropped_blocks_attention_is_canonical():
    subnet = SPACE.min_subnet()  # dropped blocks exist at the minimum depths
    dropped = next(b for b in range(12) if b not in SPACE.active_blocks(subnet.depths))
    flipped = SPACE.set_attention(subnet, (dropped,), 32)
    assert flipped != subnet and SPACE.canonical(flipped) == SPACE.canonical(subnet)


# --- BitOPs ---------------------------------------------------------------------------------------------

def test_int8_attention_counts_its_matmuls_at_8x8_bits_and_rel_pos_in_float():
    ir = analysis_ir(SPACE)
    model = BitopsModel(ir, SPACE)
    float_attention = SPACE.uniform_bits(SPACE.max_subnet(), 8, 8)
    int8_attention = SPACE.uniform_attention(float_attention, 8)
    CountBitopsPass(SPACE, float_attention)(ir)
    before = ir.cost
    CountBitopsPass(SPACE, int8_attention)(ir)
    after = ir.cost
    grid = float_attention.grid
    matmuls = sum(attention_macs(a, grid)[0] for _, a in ir.nodes("attention"))
    rel_pos = sum(attention_macs(a, grid)[1] for _, a in ir.nodes("attention"))
    assert matmuls > 0 and rel_pos > 0 and after.macs == before.macs
    assert before.bitops - after.bitops == matmuls * (32 * 32 - 8 * 8)
    assert (after.float_macs, after.float_bitops) == (rel_pos, rel_pos * 1024)
    assert model.cost(int8_attention) == (after.macs, after.bitops)
    rng = random.Random(5)
    for subnet in (SPACE.sample(rng) for _ in range(8)):
        CountBitopsPass(SPACE, subnet)(ir)
        assert model.cost(subnet) == (ir.cost.macs, ir.cost.bitops)


# --- training: LSQ quantizers on q, k, v and the softmax output -----------------------------------------

@pytest.fixture(scope="module")
def quantized_attention_supernet():
    torch.manual_seed(0)
    model, ir = build_model(SupernetSpec(SPACE, num_classes=3, lora=None))
    images = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    CalibrateActivationsPass(model.supernet, [images])(ir)
    return model, ir, images


def test_calibration_initialises_every_attention_quantizer_from_float_attention(quantized_attention_supernet):
    model, _, _ = quantized_attention_supernet
    for block in model.supernet.blocks:
        quantizers = block.attn.attention_quantizers.quantizers(8)
        assert set(quantizers) == {"q", "k", "v", "p"}
        for name, quantizer in quantizers.items():
            assert isinstance(quantizer, LsqSymmetricActQuantizer) and bool(quantizer.initialized)
            assert quantizer.offset is None and (quantizer.n, quantizer.p) == (-128, 127)
            # max |x| fills the grid; the softmax output's max is at most 1
            assert float(quantizer.scale.detach()) == pytest.approx(float(quantizer.observed_max.abs().maximum(
                quantizer.observed_min.abs())) / 127)
        assert float(quantizers["p"].observed_min) >= 0 and float(quantizers["p"].observed_max) <= 1
        assert block.attn.attention_quantizers.observing is False


def test_int8_attention_is_the_reference_on_8bit_grids_and_trains_its_steps(quantized_attention_supernet):
    model, _, images = quantized_attention_supernet
    subnet = SPACE.uniform_bits(replace(SPACE.max_subnet(), resolution=256), 32, 32)
    block = model.supernet.blocks[0]
    model.supernet.set_subnet(subnet)
    x = torch.randn(1, 16, 16, 64, generator=torch.Generator().manual_seed(2))[..., : block.attn.qkv.in_features]
    with torch.no_grad():
        float_out = block.attn(x)
        model.supernet.set_subnet(SPACE.uniform_attention(subnet, 8))
        int8_out = block.attn(x)
    assert block.attn.attention_bits == 8
    relative = float((int8_out - float_out).abs().max() / float_out.abs().max())
    assert 0 < relative < 0.1  # close, and not the float result
    model.train()
    try:
        loss = model(images, masks=torch.zeros(2, 256, 256, dtype=torch.long))
        loss.backward()
    finally:
        model.eval()
    for quantizer in block.attn.attention_quantizers.quantizers(8).values():
        assert quantizer.scale.grad is not None and float(quantizer.scale.grad.abs()) > 0
    model.zero_grad(set_to_none=True)
    model.supernet.set_subnet(subnet)


def test_training_recomputes_int8_attention_and_keeps_no_attention_map(quantized_attention_supernet, monkeypatch):
    """With the training kernels, quantized attention's core is recomputed in backward: the same gradients
    to the bit as segment-anything's order of ops, and no (heads, tokens, tokens) tensor is saved."""
    from qsamc.supernet.kernels import TrainingKernel

    model, _, _ = quantized_attention_supernet
    attn = model.supernet.blocks[0].attn
    model.supernet.set_subnet(SPACE.uniform_attention(replace(SPACE.max_subnet(), resolution=256), 8))
    x = torch.randn(1, 16, 16, attn.qkv.in_features, generator=torch.Generator().manual_seed(3), requires_grad=True)
    weights = torch.randn(1, 16, 16, attn.qkv.in_features, generator=torch.Generator().manual_seed(4))
    parameters = dict(attn.named_parameters())
    results = {}
    for kernels in (False, True):
        monkeypatch.setattr(TrainingKernel, "enabled", kernels)
        shapes = []

        def pack(tensor):
            shapes.append(tuple(tensor.shape))
            return tensor

        attn.train()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                out = attn(x)
            grads = torch.autograd.grad((out * weights).sum(), [x, *parameters.values()], allow_unused=True)
        finally:
            attn.eval()
        results[kernels] = out.detach(), grads, shapes
    (out_ref, grads_ref, shapes_ref), (out_new, grads_new, shapes_new) = results[False], results[True]
    assert torch.equal(out_ref, out_new)
    for name, a, b in zip(["x", *parameters], grads_ref, grads_new):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    assert grads_new[1 + list(parameters).index("attention_quantizers.sets.8.p.scale")] is not None
    attention_map = (attn.num_heads, 256, 256)
    assert attention_map in shapes_ref and attention_map not in shapes_new


def test_a_run_with_attention_searched_trains_the_sampled_steps_and_resumes_exactly(tmp_path, monkeypatch):
    """`qsamc train --attention searched`: the sampled subnets carry attention bits, exactly the attention
    quantizers a step ran at INT8 have their step sizes trained, and a run stopped after its checkpoint
    resumes to the same weights, attention steps included, as the run that was not stopped."""
    from qsamc.training import train as T
    from qsamc.training.config import load_train_config

    options = {"iterations": 4, "phase1_iterations": 2, "checkpoint_every": 2, "batch_size": 1, "val_limit": 2,
               "calibration_batches": 1, "attention": "searched"}
    sample, save = T.sample_subnets, T.atomic_torch_save
    sampled, saved = {}, {}

    def spied_sample(config, space, iteration):
        sampled[iteration] = sample(config, space, iteration)
        return sampled[iteration]

    def spied_save(obj, path):
        save(obj, path)
        saved[obj["iteration"]] = {k: v.clone() for k, v in obj["model"].items() if "attention_quantizers" in k}

    monkeypatch.setattr(T, "sample_subnets", spied_sample)
    monkeypatch.setattr(T, "atomic_torch_save", spied_save)
    reference = tmp_path / "reference"
    T.train(load_train_config(None, {"out": str(reference), **options}), show_progress=False)
    space = default_space("vit_t", attention_bits=(8, 32))
    assert all(len(s.attention) == 12 for subnets in sampled.values() for s in subnets)
    # Iterations 3 and 4 (after the checkpoint at 2): the blocks that ran INT8 attention in either.
    ran = {b for i in (2, 3) for s in sampled[i] for b in space.active_blocks(s.depths) if s.attention_of(b) == 8}
    assert 0 < len(ran) < 12
    for block in range(12):
        for operand in "qkvp":
            key = next(k for k in saved[4] if k.startswith(f"supernet.blocks.{block}.attn.") and f".{operand}." in k
                       and k.endswith("scale"))
            assert torch.equal(saved[2][key], saved[4][key]) == (block not in ran), key

    stopped = tmp_path / "stopped"

    def stop_at_3(config, space, iteration):
        if iteration == 3:
            raise KeyboardInterrupt
        return sample(config, space, iteration)

    monkeypatch.setattr(T, "sample_subnets", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        T.train(load_train_config(None, {"out": str(stopped), **options}), show_progress=False)
    monkeypatch.setattr(T, "sample_subnets", sample)
    T.train(load_train_config(None, {"out": str(stopped), **options}), resume=True, show_progress=False)
    final, expected = (torch.load(run / "supernet.pt", weights_only=True) for run in (stopped, reference))
    assert list(final) == list(expected) and any("attention_quantizers" in k for k in final)
    assert [k for k in final if not torch.equal(final[k], expected[k])] == []


def test_a_supernet_with_attention_quantizers_is_an_encoder_checkpoint(quantized_attention_supernet, tmp_path):
    """A run's supernet.pt (an FP32 reference run's, say) starts the next run: its encoder is the float
    weights, without the layers' or attention's quantizer state."""
    from qsamc.sam import build_encoder

    model, _, _ = quantized_attention_supernet
    state = model.state_dict()
    assert any(".attention_quantizers." in k for k in state)
    torch.save(state, tmp_path / "supernet.pt")
    encoder = build_encoder("vit_t", tmp_path / "supernet.pt")
    assert all(torch.equal(v, state[f"supernet.{k}"]) for k, v in encoder.state_dict().items())


def test_a_subnet_cannot_ask_for_attention_bits_without_quantizers():
    from qsamc.supernet.encoder import Supernet

    supernet = Supernet.build("vit_t", space=SPACE)
    with pytest.raises(ValueError, match=r"^block 0's attention has no 8-bit quantizers"):
        supernet.set_subnet(SPACE.uniform_attention(SPACE.max_subnet(), 8))


# --- export: Q/DQ on both inputs of both attention MatMuls ---------------------------------------------

def _attention_matmuls(model: onnx.ModelProto, block: int) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.name.startswith(f"/blocks.{block}/attn/MatMul")]


def _dequantized(model: onnx.ModelProto, name: str) -> bool:
    producer = {o: n for n in model.graph.node for o in n.output}.get(name)
    return producer is not None and producer.op_type == "DequantizeLinear"


@pytest.mark.parametrize("target", [CPU, A100], ids=lambda t: t.name)
def test_lowered_int8_attention_emits_qdq_where_the_target_runs_it_and_matches(quantized_attention_supernet, target):
    """vit_t at 256 px: windowed blocks (16 tokens) and global blocks (256 tokens) both run INT8 on the
    CPU; TensorRT's rule admits both too (<= 512 tokens, head size 32). Every lowered attention half
    matches the fake-quantized one in ONNX Runtime within one step of the softmax grid."""
    _, ir, _ = quantized_attention_supernet
    subnet = SPACE.uniform_attention(SPACE.uniform_bits(replace(SPACE.max_subnet(), resolution=256), 8, 8), 8)
    static = lowered_subnet(ir, subnet, target.with_float_type("fp32"))
    from qsamc.passes import ExtractSubnetPass

    reference = ExtractSubnetPass(subnet)(ir).ir.root
    for block in (0, 2):  # windowed, global
        model, tokens = part_onnx(static, "attention", block, target.with_float_type("fp32"))
        matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and "/attn/MatMul" in n.name]
        assert len(matmuls) == 2
        assert all(_dequantized(model, i) for n in matmuls for i in n.input)
        zero_points = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
        assert zero_points == []  # INT8 only, zero-point 0: what TensorRT's fused MHA reads
        from qsamc.export.parts import AttentionPart

        with torch.no_grad():
            expected = AttentionPart(reference.blocks[str(block)])(tokens)
        actual = ort_session(model, threads=1, exact=True).run(None, {model.graph.input[0].name: tokens.numpy()})[0]
        error = np.abs(actual - expected.numpy()).max() / np.abs(expected.numpy()).max()
        assert error < 2.0 ** -7


def test_attention_the_rule_does_not_admit_is_deployed_in_the_float_type(quantized_attention_supernet):
    """TensorRT fuses INT8 MHA over at most 512 tokens, so a vit_b/l/h global block at 512 px (1024 tokens)
    stays float there. vit_t's largest global block has 256 tokens, so the same rule is checked here with
    its limit at 128: the global block is deployed float (no Q/DQ on its matmuls, lint clean) while the
    CPU runs it in INT8; windowed blocks (16 tokens) are INT8 on both."""
    _, ir, _ = quantized_attention_supernet
    rule = AttentionRule(max_tokens=128, head_dims=TENSORRT_MHA.head_dims)
    tensorrt = dataclasses.replace(A100, deployment=dataclasses.replace(A100.deployment, int8_attention=rule))
    subnet = SPACE.uniform_attention(SPACE.uniform_bits(replace(SPACE.max_subnet(), resolution=256), 8, 8), 8)
    example = torch.randn(1, 3, 256, 256)
    for target, global_int8 in ((CPU, True), (tensorrt, False), (A100, True)):
        model = emit_onnx(lowered_subnet(ir, subnet, target), example, target)
        for block, int8 in ((0, True), (2, global_int8)):
            matmuls = _attention_matmuls(model, block)
            assert len(matmuls) == 2
            assert all(_dequantized(model, i) == int8 for n in matmuls for i in n.input), (target.name, block)
        assert not any("attention" in p for p in lint_tensorrt(model, target.deployment))
    assert PartKeys(SPACE, tensorrt).attention(subnet, 0) == ("int8",) and PartKeys(SPACE, tensorrt).attention(subnet, 2) == ()
    assert PartKeys(SPACE, CPU).attention(subnet, 2) == ("int8",)


# --- latency tables -------------------------------------------------------------------------------------

# The small space the latency tests time: one resolution, MLP ratio and bit pair, attention precision searched.
TIMED_SPACE = SPACE.restrict(resolutions=(128,), mlp_ratios=(4.0,), weight_bits=(8,), act_bits=(8,))


@pytest.fixture(scope="module")
def timed_table():
    """The CPU latency table of `TIMED_SPACE` (int8 attention entries included), timed once for the module."""
    from qsamc.profiling.profile import build_table
    from qsamc.profiling.timers import ProfileSettings

    return build_table(TIMED_SPACE, CPU, ProfileSettings(warmup=2, repeats=7), calibration=1)


def test_latency_tables_time_int8_attention_and_search_reads_them(timed_table):
    space, table = TIMED_SPACE, timed_table
    kernels = "int8xint8|int8xint8"
    assert {k for k in table.entries if k.startswith("attention")} == {
        f"attention|8|{w}|{kernels}{suffix}" for w in (0, 4) for suffix in ("", "|int8")}
    cost = TableLatency(table, space, CPU)
    subnet = space.max_subnet()
    one = space.set_attention(subnet, (0,), 8)  # block 0: windowed
    difference = table.context_scale * (table.entries[f"attention|8|4|{kernels}|int8"]
                                        - table.entries[f"attention|8|4|{kernels}"])
    assert cost.cost(one) - cost.cost(subnet) == pytest.approx(difference)


def test_latency_search_takes_int8_attention_exactly_where_the_table_says_it_pays(timed_table, tmp_path):
    """A small supernet with attention precision in its space (calibrated random weights), its CPU
    latency table, `qsamc search --latency` under a budget, then `qsamc export` of the subnet found. The
    cheapest subnet under the table takes INT8 attention exactly on the blocks whose INT8 entry is the
    faster one (on an AVX2 CPU without VNNI it rarely is); the export verifies against the subnet."""
    from qsamc.pipeline import export_subnet, run_search
    from qsamc.search.cost import cheapest
    from qsamc.search.evolution import EvolutionConfig
    from qsamc.training.runs import save_supernet

    space = TIMED_SPACE
    torch.manual_seed(0)
    model, ir = build_model(SupernetSpec(space, num_classes=4, lora=None))
    CalibrateActivationsPass(model.supernet, [torch.randn(2, 3, 128, 128)])(ir)
    run = tmp_path / "run"
    save_supernet(run, SupernetSpec(space, num_classes=4, lora=None), model)
    table = timed_table
    table.save(tmp_path / "table.json")
    cost = TableLatency(table, space, CPU)
    floor = cheapest(space, cost)
    kernels = "int8xint8|int8xint8"
    for block in space.active_blocks(floor.depths):
        window = PartKeys(space, CPU).window[block]
        pays = table.entries[f"attention|8|{window}|{kernels}|int8"] < table.entries[f"attention|8|{window}|{kernels}"]
        assert floor.attention_of(block) == (8 if pays else 32)
    budget = f"{1e3 * (cost.cost(floor) + cost.cost(space.max_subnet())) / 2:.4f}ms"
    config = EvolutionConfig(population=4, top_k=2, mutations=2, crossovers=2, generations=2)
    result, written = run_search(run, "cpu", False, True, [budget], tmp_path / "search", table=tmp_path / "table.json",
                                 dataset="synthetic", val_limit=4, config=config)
    best = result.results[0].best
    assert best.costs["latency"] <= float(budget[:-2]) / 1e3 and len(best.subnet.attention) == 12
    found = next(p for p in written if p.name.startswith("best-"))
    report = export_subnet(run, found, "cpu", "onnx", tmp_path / "export", samples=1, dataset="synthetic", val_limit=4)
    assert report.subnet == best.subnet and all(p.ok for p in report.parts) and report.task.ok


def test_space_and_bitops_commands_know_attention_bits(run_cli, tmp_path):
    import json

    code, out, err = run_cli("space", "--model", "vit_t", "--attention", "searched")
    assert (code, err) == (0, "")
    assert "attention bits (q, k, v, softmax)" in out and "[8, 32]" in out
    assert f"subnets: 10^{SPACE.log10_count():.1f}" in out
    subnet = SPACE.sample(random.Random(4))
    assert 8 in subnet.attention
    subnet.save(tmp_path / "subnet.json")
    code, out, err = run_cli("bitops", "--model", "vit_t", "--subnet", str(tmp_path / "subnet.json"), "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["subnet"]["attention"] == list(subnet.attention)
    assert (data["macs"], data["bitops"]) == BitopsModel(analysis_ir(SPACE), SPACE).cost(subnet)


def test_cpu_target_runs_float_attention_as_one_fused_op_equal_to_sams(quantized_attention_supernet):
    """Float attention on the cpu target: the rel-pos fold and ONNX Runtime's MultiHeadAttention in place
    of SAM's MatMul / rel-pos adds / Softmax / MatMul, the same function (windowed and global blocks);
    TensorRT targets keep the standard ops, and so does the plain cpu graph the baselines quantize."""
    _, ir, _ = quantized_attention_supernet
    subnet = SPACE.uniform_bits(replace(SPACE.max_subnet(), resolution=256), 32, 32)
    from qsamc.export.parts import AttentionPart
    from qsamc.passes import ExtractSubnetPass

    reference = ExtractSubnetPass(subnet)(ir).ir.root
    for target, fused in ((CPU, True), (dataclasses.replace(CPU, fuse_attention=False), False), (A100, False)):
        static = lowered_subnet(ir, subnet, target.with_float_type("fp32"))
        for block in (0, 2):
            model, tokens = part_onnx(static, "attention", block, target.with_float_type("fp32"))
            ops = [n.op_type for n in model.graph.node]
            assert ("MultiHeadAttention" in ops) == fused and ("Softmax" in ops) == (not fused)
            with torch.no_grad():
                expected = AttentionPart(reference.blocks[str(block)])(tokens).numpy()
            actual = ort_session(model, threads=1).run(None, {model.graph.input[0].name: tokens.numpy()})[0]
            assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()
