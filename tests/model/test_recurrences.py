"""Every recurrence path equals torch.nn.GRU / nn.LSTM (or the step-by-step reference) in
outputs and all gradients; every compiled kernel variant this CPU runs is tested, each loaded
explicitly (char_rnn.Compute(kernel=...)), plus one subprocess test of FEDTEXT_KERNEL."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fedtext.cli.main import main as cli_main
from fedtext.errors import FedtextError
from fedtext.model import kernel, recurrences
from fedtext.model.char_rnn import CharRNN, Compute, ModelConfig

SHAPES = [  # (T, B, E, H): batch 1, T 1, H not a multiple of any vector width, B above 8 rows
    (1, 1, 3, 5),
    (7, 3, 4, 20),
    (5, 8, 6, 33),
    (3, 13, 5, 16),
    (9, 2, 8, 64),
]
ARM = platform.machine().lower() in ("aarch64", "arm64")
# This architecture's variants. The numerical tests run every one this CPU runs (avx2 and
# scalar on every x86-64 CPU; avx512 where the CPU has it), so nothing is skipped for lack of
# AVX-512; test_every_variant_of_this_architecture_builds compiles the rest.
ARCH_VARIANTS = ["neon", "scalar"] if ARM else ["avx512", "avx2", "scalar"]


def _variant_param(v):
    why = None
    try:
        kernel.load(v)
    except kernel.KernelUnavailable as e:
        why = str(e)  # no compiler on this machine: nothing compiled can be tested
    return pytest.param(v, marks=pytest.mark.skipif(why is not None, reason=why or ""), id=v)


VARIANTS = [_variant_param(v) for v in ARCH_VARIANTS if kernel.cannot_run(v) is None]
# Every fp32 path: the pure-PyTorch ones and each kernel variant, as (impl, kernel) Computes.
FP32_PATHS = [pytest.param(Compute("torch"), id="torch"), pytest.param(Compute("nn"), id="nn")] + [
    pytest.param(Compute("kernel", kernel=p.values[0]), marks=p.marks, id=f"kernel-{p.id}")
    for p in VARIANTS]


def rel_err(a, b):
    """max |a - b| / max |b|: the tolerance measure the issue states (1e-5 for fp32 paths)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def model_and_nn(compute, cell, T, B, E, H, num_layers=1, seed=0):
    """Our CharRNN vs Embedding + nn.GRU / nn.LSTM + Linear with the same weights (nn.LSTM's
    bias_hh = 0: ours has one bias) on random ids, with a loss on the logits and on the final
    state, so the gradients of every weight, h0 (and c0) and the state outputs are checked."""
    torch.manual_seed(seed)
    V = 11
    ours = CharRNN(ModelConfig(vocab_size=V, embed_dim=E, hidden_size=H, num_layers=num_layers,
                               cell=cell), compute=compute)
    with torch.no_grad():  # non-zero biases so every gradient is exercised
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rnn_sd = {k[4:]: v for k, v in ours.state_dict().items() if k.startswith("rnn.")}
    if cell == "gru":
        ref = nn.GRU(E, H, num_layers)
        ref.load_state_dict(rnn_sd)
    else:
        ref = nn.LSTM(E, H, num_layers)
        ref_sd = {}
        for k in range(num_layers):
            ref_sd |= {f"weight_ih_l{k}": rnn_sd[f"weight_ih_l{k}"],
                       f"weight_hh_l{k}": rnn_sd[f"weight_hh_l{k}"],
                       f"bias_ih_l{k}": rnn_sd[f"bias_l{k}"],
                       f"bias_hh_l{k}": torch.zeros(4 * H)}
        ref.load_state_dict(ref_sd)
    emb, head = nn.Embedding(V, E), nn.Linear(H, V)
    emb.load_state_dict(ours.embedding.state_dict())
    head.load_state_dict(ours.head.state_dict())
    idx = torch.randint(0, V, (B, T))
    states = [0.5 * torch.randn(num_layers, B, H) for _ in range(1 if cell == "gru" else 2)]
    g_out = torch.randn(B, T, V)
    g_states = [torch.randn(num_layers, B, H) for _ in states]

    def loss(logits, final):
        final = (final,) if cell == "gru" else final
        return (logits * g_out).sum() + sum((s * g).sum() for s, g in zip(final, g_states))

    ours_states = [s.clone().requires_grad_() for s in states]
    logits, final = ours.run(idx, ours_states[0] if cell == "gru" else tuple(ours_states))
    loss(logits, final).backward()
    ours_grads = {k: p.grad for k, p in ours.named_parameters()}
    ours_grads |= {f"state{i}": s.grad for i, s in enumerate(ours_states)}

    ref_states = [s.clone().requires_grad_() for s in states]
    out, ref_final = ref(emb(idx.t()), ref_states[0] if cell == "gru" else tuple(ref_states))
    ref_logits = head(out).transpose(0, 1)
    loss(ref_logits, ref_final).backward()
    ref_grads = {"embedding.weight": emb.weight.grad, "head.weight": head.weight.grad,
                 "head.bias": head.bias.grad}
    ref_grads |= {f"state{i}": s.grad for i, s in enumerate(ref_states)}
    for k, p in ref.named_parameters():
        if cell == "lstm" and k.startswith("bias_hh"):
            continue  # a constant 0 here; ours has no such parameter
        ref_grads[f"rnn.{k.replace('bias_ih', 'bias')}" if cell == "lstm" else f"rnn.{k}"] = p.grad
    final = (final,) if cell == "gru" else final
    ref_final = (ref_final,) if cell == "gru" else ref_final
    return (logits, final, ours_grads), (ref_logits, ref_final, ref_grads)


def assert_close(ours, ref, tol=1e-5):
    (logits, final, grads), (ref_logits, ref_final, ref_grads) = ours, ref
    assert rel_err(logits, ref_logits) < tol
    for s, r in zip(final, ref_final, strict=True):
        assert rel_err(s, r) < tol
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        assert rel_err(grads[k], ref_grads[k]) < tol, k


@pytest.mark.parametrize("compute", FP32_PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_fp32_paths_equal_torch_nn(cell, shape, compute):
    assert_close(*model_and_nn(compute, cell, *shape))


@pytest.mark.parametrize("compute", FP32_PATHS)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_two_layers_equal_torch_nn(cell, compute):
    assert_close(*model_and_nn(compute, cell, 6, 4, 5, 24, num_layers=2))


def raw_recurrence(cell, reset_after, T, B, H, impl, kernel_variant="auto", dtype=torch.float32,
                   precision="fp32", seed=1):
    """The recurrence alone, outputs and gradients of (xp, h0, [c0], W_hh, [b_hh])."""
    torch.manual_seed(seed)
    G = 4 if cell == "lstm" else 3
    xp, h0, c0 = torch.randn(T, B, G * H), torch.randn(B, H), torch.randn(B, H)
    w, b = torch.randn(G * H, H) / H**0.5, torch.randn(G * H)
    d_out, d_c = torch.randn(T, B, H), torch.randn(B, H)
    if cell == "lstm":
        ins = [t.to(dtype).requires_grad_() for t in (xp, h0, c0, w)]
        out, c_last = recurrences.lstm_recurrence(*ins, precision, impl, kernel_variant)
        grads = torch.autograd.grad((out, c_last), ins, (d_out.to(dtype), d_c.to(dtype)))
        return [out, c_last, *grads]
    ins = [t.to(dtype).requires_grad_() for t in ((xp, h0, w, b) if reset_after else (xp, h0, w))]
    out = recurrences.gru_recurrence(*ins[:3], ins[3] if reset_after else None, reset_after,
                                     precision, impl, kernel_variant)
    return [out, *torch.autograd.grad(out, ins, d_out.to(dtype))]


CELLS = [("gru", True), ("gru", False), ("lstm", True)]
CELL_IDS = ["gru-reset-after", "gru-reset-before", "lstm"]


@pytest.mark.parametrize("path", [pytest.param(("torch", "auto"), id="torch")] + [
    pytest.param(("kernel", p.values[0]), marks=p.marks, id=f"kernel-{p.id}") for p in VARIANTS])
@pytest.mark.parametrize("cell,reset_after", CELLS, ids=CELL_IDS)
def test_recurrences_equal_float64_reference(cell, reset_after, path):
    """Each cell (also reset_after=False, which nn.GRU lacks) against autograd of the
    step-by-step reference in float64: the tolerance holds against the exact answer too."""
    for T, B, H in [(1, 1, 5), (8, 3, 20), (4, 13, 33), (11, 9, 40)]:
        ours = raw_recurrence(cell, reset_after, T, B, H, *path)
        ref = raw_recurrence(cell, reset_after, T, B, H, "reference", dtype=torch.float64)
        for a, b in zip(ours, ref, strict=True):
            assert rel_err(a, b) < 1e-5, (T, B, H)


def test_reset_before_differs_from_reset_after():
    """Guard against a variant mix-up: the two GRUs must give different outputs."""
    a = raw_recurrence("gru", True, 5, 2, 10, "torch")[0]
    b = raw_recurrence("gru", False, 5, 2, 10, "torch")[0]
    assert rel_err(a, b) > 1e-2


def _bf16_variant():
    """The kernel variant with bf16 dot products here (avx512 or neon), or None."""
    for v in ARCH_VARIANTS:
        try:
            if kernel.cannot_run(v) is None and kernel.load(v).bf16:
                return v
        except kernel.KernelUnavailable:
            pass
    return None


BF16_VARIANT = _bf16_variant()
BF16_KERNEL = pytest.mark.skipif(BF16_VARIANT is None, reason="no bf16 dot products on this "
                                 "CPU (AVX512_BF16 / ARM BF16)")


@pytest.mark.parametrize("impl", [pytest.param("kernel", marks=BF16_KERNEL), "torch"])
@pytest.mark.parametrize("cell,reset_after", CELLS, ids=CELL_IDS)
def test_bf16_tolerance(cell, reset_after, impl):
    """bf16 operands keep 8 mantissa bits. Measured at these shapes against the float64
    reference: 1.9e-3 to 2.5e-3 on outputs, up to 4.7e-3 on gradients (LSTM), kernel and
    torch paths alike. We promise 2e-2, and check the error is really bf16-sized (not an fp32
    path in disguise)."""
    ours = raw_recurrence(cell, reset_after, 9, 5, 48, impl, BF16_VARIANT if impl == "kernel"
                          else "auto", precision="bf16")
    ref = raw_recurrence(cell, reset_after, 9, 5, 48, "reference", dtype=torch.float64)
    assert 1e-5 < rel_err(ours[0], ref[0]) < 2e-2
    for a, b in zip(ours, ref, strict=True):
        assert rel_err(a, b) < 2e-2


SCALAR = next(p for p in VARIANTS if p.id == "scalar")


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc")
                    is None, reason="no C compiler")
@pytest.mark.parametrize("variant", ARCH_VARIANTS)
def test_every_variant_of_this_architecture_builds(variant):
    """Each variant of this architecture compiles, with its bf16 flags where it has them, and
    exports the kernel's entry points, whether or not this CPU can run it (the avx512 build
    is checked on an AVX2 machine too); a variant the CPU lacks is refused in one line."""
    flags = kernel._FLAGS[variant] + kernel._BF16_FLAGS.get(variant, [])
    if ARM and variant == "neon":
        flags = kernel._FLAGS[variant]  # +bf16 needs a compiler that knows armv8.2-a+bf16
    so = kernel._build("rnn_kernel.c", f"rnn_kernel_{variant}_buildcheck", flags)
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True,
                             text=True).stdout if shutil.which("nm") else ""
    for name in ("fedtext_gru_forward", "fedtext_gru_backward", "fedtext_lstm_forward",
                 "fedtext_lstm_backward", "fedtext_rnn_variant"):
        assert not symbols or name in symbols
    why = kernel.cannot_run(variant)
    if why is not None:
        assert "\n" not in why and variant in why
        with pytest.raises(FedtextError, match=variant):
            kernel.load(variant)


@pytest.mark.parametrize("variant", [SCALAR])
def test_bf16_refused_without_native_dot_products(variant):
    """A kernel without bf16 dot products (and any CPU without them) refuses bf16 in one line:
    the fallback would be ~26x slower than fp32."""
    model = CharRNN(ModelConfig(vocab_size=11, embed_dim=4, hidden_size=8),
                    compute=Compute("kernel", "bf16", variant))
    with pytest.raises(FedtextError, match="bf16") as e:
        model(torch.randint(0, 11, (2, 3)))
    assert "\n" not in str(e.value)
    if not kernel.bf16_native():
        with pytest.raises(FedtextError, match="bf16"):
            recurrences.resolve("cpu", "gru", True, "bf16")


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_no_grad_forward_equals_training_forward(variant):
    """Under no_grad the kernel keeps nothing for a backward (scratch gates); same numbers."""
    for cell in ("gru", "lstm"):
        torch.manual_seed(5)
        model = CharRNN(ModelConfig(vocab_size=11, embed_dim=6, hidden_size=40, cell=cell),
                        compute=Compute("kernel", kernel=variant))
        idx = torch.randint(0, 11, (9, 12))
        with torch.no_grad():
            a, _ = model.run(idx)
            model.run(torch.randint(0, 11, (9, 12)))  # reuses the scratch in between
        b, _ = model.run(idx)
        assert torch.equal(a, b.detach())


def test_resolve_picks_the_fastest_exact_path():
    try:
        expected = "kernel" if kernel.select() else "torch"
    except kernel.KernelUnavailable:
        expected = "torch"
    for cell, reset_after in CELLS:
        assert recurrences.resolve_impl("cpu", cell, reset_after) == expected
        assert recurrences.resolve_impl("cpu", cell, reset_after, dtype=torch.float64) == "torch"
    assert recurrences.resolve_impl("cuda", "gru", True) == "nn"
    assert recurrences.resolve_impl("cuda", "lstm") == "nn"
    assert recurrences.resolve_impl("cuda", "gru", False) == "torch"  # nn has no such GRU
    with pytest.raises(ValueError, match="reset_after=True"):
        recurrences.resolve_impl("cpu", "gru", False, impl="nn")


def test_describe_compute_names_the_path():
    cfg = ModelConfig(vocab_size=11, embed_dim=4, hidden_size=8, cell="lstm")
    d = recurrences.describe_compute(cfg, Compute("torch"))
    assert d == {"cell": "lstm", "impl": "torch", "kernel": None, "precision": "fp32",
                 "threads": torch.get_num_threads(), "device": "cpu"}
    d = recurrences.describe_compute(ModelConfig(), Compute("kernel", kernel="scalar"))
    assert (d["cell"], d["reset_after"], d["impl"], d["kernel"]) in [
        ("gru", True, "kernel", "scalar"), ("gru", True, "torch", None)]  # None: no compiler


def test_lstm_research_benchmark_parameter_count_and_init():
    """Embedding(90, 8) -> LSTM 256 -> LSTM 256 -> Dense(90) is TFF's 820,522-parameter model
    (one bias per LSTM layer, as Keras), with Keras' LSTM init."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=90, embed_dim=8, hidden_size=256, num_layers=2,
                                cell="lstm"))
    assert model.num_params() == 820_522
    H = 256
    for k in range(2):
        w_ih, w_hh, b = model.rnn.layer_weights(k)
        assert torch.equal(b[H: 2 * H], torch.ones(H))  # unit_forget_bias
        assert not b[:H].any() and not b[2 * H:].any()
        eye = w_hh.t() @ w_hh  # an orthogonal (H, 4H) Keras recurrent kernel, transposed
        assert torch.allclose(eye, torch.eye(H), atol=1e-4)
        assert w_ih.abs().max() <= (6 / (w_ih.shape[1] + 4 * H)) ** 0.5  # glorot_uniform


@pytest.mark.parametrize("compute", FP32_PATHS)
def test_lstm_generation_carries_state(compute):
    """Generating with an LSTM: running the prompt and then one char at a time with the
    carried (h, c) gives the logits of running the whole text at once."""
    torch.manual_seed(6)
    model = CharRNN(ModelConfig(vocab_size=11, embed_dim=4, hidden_size=20, num_layers=2,
                                cell="lstm"), compute=compute).eval()
    prompt = torch.randint(0, 11, (1, 5))
    gen = torch.Generator().manual_seed(0)
    new = torch.stack(list(model.generate(prompt, 6, generator=gen)), dim=1)  # (1, 6)
    assert new.shape == (1, 6) and int(new.max()) < 11
    text = torch.cat([prompt, new], dim=1)
    with torch.no_grad():
        whole, _ = model.run(text)
        logits, state = model.run(text[:, :5])
        steps = [logits]
        for t in range(5, text.shape[1]):
            logits, state = model.run(text[:, t: t + 1], state)
            steps.append(logits)
    assert isinstance(state, tuple) and state[1].shape == (2, 1, 20)
    assert rel_err(torch.cat(steps, dim=1), whole) < 1e-5


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                          capture_output=True, text=True)


def test_fallback_with_notice_when_kernel_disabled(tmp_path):
    """FEDTEXT_NO_KERNEL=1: fedtext says so in one line per path, and trains on the fastest
    PyTorch path: the custom Function for the GRU, torch's own nn.LSTM for the LSTM."""
    code = (
        "import torch\n"
        "from fedtext.model import recurrences\n"
        "from fedtext.model.char_rnn import CharRNN, ModelConfig\n"
        "for cell, impl in (('gru', 'torch'), ('lstm', 'nn'), ('gru', 'torch')):\n"
        "    assert recurrences.resolve_impl('cpu', cell) == impl\n"
        "    m = CharRNN(ModelConfig(vocab_size=11, embed_dim=4, hidden_size=8, cell=cell))\n"
        "    m(torch.randint(0, 11, (2, 3)), torch.randint(0, 11, (2, 3)))[1].backward()\n"
        "x = torch.randn(3, 2, 32)\n"  # the functional recurrence still runs, on the Function
        "h, c = recurrences.lstm_recurrence(x, torch.zeros(2, 8), torch.zeros(2, 8),\n"
        "                                   torch.randn(32, 8))\n"
        "assert h.shape == (3, 2, 8)\n"
    )
    res = _run(code, FEDTEXT_NO_KERNEL="1", FEDTEXT_CACHE=str(tmp_path))
    assert res.returncode == 0, res.stderr
    notices = [line for line in res.stderr.splitlines() if "kernel unavailable" in line]
    assert len(notices) == 2 and all("FEDTEXT_NO_KERNEL" in n for n in notices)
    assert "pure-PyTorch" in notices[0] and "nn.LSTM" in notices[1]


def test_missing_compiler_falls_back(tmp_path):
    """No compiler: the kernel is unavailable with the reason, never a crash; info says so."""
    code = ("from fedtext.model import kernel, recurrences\n"
            "print(recurrences.resolve('cpu', 'lstm').fallback)\n"
            "print(kernel.kernel_info()['kernel'])")
    res = _run(code, CC="/nonexistent/cc", PATH=str(tmp_path), FEDTEXT_CACHE=str(tmp_path))
    assert res.returncode == 0, res.stderr
    reason, variant = res.stdout.splitlines()
    assert "compiler" in reason and variant == "None"
    assert len([line for line in res.stderr.splitlines() if "unavailable" in line]) == 1


def test_fedtext_kernel_variable_forces_a_variant(tmp_path):
    code = ("from fedtext.model import recurrences\n"
            "from fedtext.model.char_rnn import Compute, ModelConfig\n"
            "print(recurrences.describe_compute(ModelConfig(), Compute())['kernel'])")
    res = _run(code, FEDTEXT_KERNEL="scalar")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() in ("scalar", "None")  # None: no compiler here
    other = "avx2" if ARM else "neon"  # a variant this CPU can't run: one error line
    res = _run(code, FEDTEXT_KERNEL=other)
    assert res.returncode != 0 and "FedtextError" in res.stderr and other in res.stderr


def test_info_command(capsys):
    assert cli_main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"cpu", "cpu_features", "kernel", "bf16_native", "threads", "torch"} <= info.keys()
    assert info["torch"] == torch.__version__
    assert cli_main(["info"]) == 0
    assert "kernel:" in capsys.readouterr().out


CROSS_CC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")


@pytest.mark.skipif(ARM or not (CROSS_CC and QEMU and shutil.which("cc")),
                    reason="needs cc, aarch64-linux-gnu-gcc and qemu-aarch64 (runs the neon "
                    "build on x86)")
def test_neon_build_under_qemu(tmp_path):
    """The neon variant (and its ARM BF16 path), cross-compiled and run under qemu, equals the
    native scalar build (which the tests above hold to torch) on every entry point."""
    here = Path(__file__).parent
    src = [str(here / "kernel_harness.c"),
           str(Path(kernel.__file__).parent / "csrc" / "rnn_kernel.c")]
    common = ["-O2", "-std=gnu11", "-ffp-contract=fast", "-pthread", "-static"]

    def run(cc, flags, name, bf16, runner=()):
        exe = tmp_path / name
        subprocess.run([cc, *common, *flags, "-o", str(exe), *src], check=True)
        subprocess.run([*runner, str(exe), str(tmp_path / f"{name}.bin"), str(bf16)], check=True)
        return np.fromfile(tmp_path / f"{name}.bin", dtype=np.float32)

    scalar = run("cc", [], "scalar", 0)
    qemu = [QEMU, "-cpu", "max"]
    neon = run(CROSS_CC, ["-DFEDTEXT_NEON"], "neon", 0, qemu)
    assert neon.shape == scalar.shape and np.abs(neon - scalar).max() < 1e-5 * np.abs(scalar).max()
    bf16 = run(CROSS_CC, ["-DFEDTEXT_NEON", "-DFEDTEXT_BF16", "-march=armv8.2-a+bf16"], "bf16",
               1, qemu)
    err = np.abs(bf16 - scalar).max() / np.abs(scalar).max()
    assert 1e-5 < err < 2e-2


def test_auto_lstm_inference_on_big_batches_equals_the_kernel():
    """Under no_grad an "auto" LSTM hands batches of NN_INFERENCE_ROWS+ rows to torch's own
    LSTM (faster there than the kernel, BENCHMARKS.md): the same logits within 1e-5."""
    from fedtext.model.char_rnn import NN_INFERENCE_ROWS

    cfg = ModelConfig(vocab_size=90, embed_dim=8, hidden_size=48, num_layers=2, cell="lstm")
    torch.manual_seed(7)
    auto = CharRNN(cfg, compute=Compute("auto"))
    ref = CharRNN(cfg, compute=Compute("torch"))
    ref.load_state_dict(auto.state_dict())
    for rows in (NN_INFERENCE_ROWS - 1, NN_INFERENCE_ROWS):
        idx = torch.randint(0, 90, (rows, 15))
        with torch.no_grad():
            a, _ = auto.run(idx)
            b, _ = ref.run(idx)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
