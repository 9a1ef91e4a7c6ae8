"""[model]: which model a run starts from, and how its recurrence is computed.

    spec = ModelSpec(init="pretrained")              # the shipped pre-trained model
    spec = ModelSpec(init="scratch", hidden_size=64) # a fresh model of the task's architecture
    model, vocab = load_initial_model(spec, task, seed=0)

`init` is "pretrained" (fedtext/assets/pretrained), "scratch", a checkpoint directory, or a
train/pretrain run directory (its final/ or model/ checkpoint). The architecture fields are
for "scratch" only; left out, they are the task's defaults (the tutorial: Embedding 256,
GRU 1024). `impl` and `precision` say how the recurrence runs (char_rnn.Compute), which
changes speed, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from fedtext.data.vocab import Vocab
from fedtext.errors import FedtextError
from fedtext.model import recurrences
from fedtext.model.char_rnn import CharRNN, Compute, ModelConfig

ARCH_FIELDS = ("embed_dim", "hidden_size", "num_layers", "cell")


@dataclass(frozen=True)
class ModelSpec:
    """[model]: the initial model and the recurrence's implementation."""

    init: str = field(default="pretrained", metadata={
        "flag": "model", "metavar": "pretrained|scratch|CKPT",
        "help": "'pretrained' (the shipped model), 'scratch' (a new one: see --hidden-size "
        "...), a checkpoint directory, or a run directory (its final model)"})
    embed_dim: int | None = field(default=None, metadata={
        "help": "embedding size (--model scratch; default: the task's)"})
    hidden_size: int | None = field(default=None, metadata={
        "help": "recurrent units (--model scratch; default: the task's)"})
    num_layers: int | None = field(default=None, metadata={
        "help": "recurrent layers (--model scratch; default: the task's)"})
    cell: str | None = field(default=None, metadata={
        "choices": ("gru", "lstm"), "help": "recurrent cell (--model scratch; default: the "
        "task's)"})
    impl: str = field(default="auto", metadata={
        "flag": "gru-impl", "choices": recurrences.IMPLS,
        "help": "GRU implementation: auto (the fastest exact one here), kernel (the C "
        "kernel), torch (pure PyTorch), nn (torch's own GRU), reference (step by step)"})
    precision: str = field(default="fp32", metadata={
        "choices": recurrences.PRECISIONS,
        "help": "bf16: the GRU's recurrent matmuls in bfloat16 (faster, not exact)"})

    def __post_init__(self):
        if not self.init.strip():
            raise FedtextError("init must not be empty")
        for name in ("embed_dim", "hidden_size", "num_layers"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise FedtextError(f"{name} must be >= 1, not {v}")
        if self.cell not in (None, "gru", "lstm"):
            raise FedtextError(f"cell must be one of gru, lstm, not {self.cell!r}")
        try:
            self.compute()
        except ValueError as e:
            raise FedtextError(str(e)) from None
        if self.init != "scratch":
            given = [f for f in ARCH_FIELDS if getattr(self, f) is not None]
            if given:
                raise FedtextError(f"{given[0]} describes a new model: it needs model = "
                                   f"'scratch' (model is {self.init!r})")

    def compute(self) -> Compute:
        return Compute(self.impl, self.precision)

    def architecture(self, vocab: Vocab, defaults: dict) -> ModelConfig:
        """The ModelConfig of a scratch model: these fields, else the task's defaults."""
        arch = {f: getattr(self, f) if getattr(self, f) is not None else defaults[f]
                for f in ARCH_FIELDS}
        return ModelConfig(vocab_size=vocab.size, **arch)

    def resolved(self, model_config: ModelConfig) -> ModelSpec:
        """With the architecture spelled out (scratch runs), for the saved config."""
        if self.init != "scratch":
            return self
        return replace(self, **{f: getattr(model_config, f) for f in ARCH_FIELDS})


def check_device(device: str) -> str:
    """`device` if torch can use it here, else a FedtextError saying why (a typo, or no GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise FedtextError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") \
            from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "no GPU found"
            raise FedtextError(f"--device {device}: {why} (torch {torch.__version__}); use "
                               "--device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FedtextError(f"--device {device}: only {torch.cuda.device_count()} GPUs")
    elif dev.type != "cpu":
        raise FedtextError(f"--device {device}: fedtext runs on cpu or cuda")
    return device


def he_normal_lstm_kernels_(model: CharRNN) -> None:
    """Re-draw every LSTM input kernel as Keras' `he_normal` (TFF's Shakespeare model:
    `tf.keras.layers.LSTM(256, kernel_initializer='he_normal')`): a normal of stddev
    sqrt(2 / fan_in) / 0.8796 truncated at two stddevs (Keras' VarianceScaling(2.0, "fan_in",
    "truncated_normal")), fan_in = the layer's input size. Recurrent kernels stay orthogonal."""
    rnn = model.rnn
    with torch.no_grad():
        for k in range(rnn.num_layers):
            w_ih = rnn.layer_weights(k)[0]  # (4H, In): Keras' (In, 4H) kernel, transposed
            std = (2.0 / w_ih.shape[1]) ** 0.5 / 0.87962566103423978
            torch.nn.init.trunc_normal_(w_ih, 0.0, std, -2 * std, 2 * std)


def load_initial_model(spec: ModelSpec, vocab: Vocab, defaults: dict, seed: int = 0
                       ) -> CharRNN:
    """The model a run starts from.

    Args:
        spec: the [model] settings.
        vocab: the task's vocabulary: a loaded checkpoint must use the same one.
        defaults: the task's architecture, for a scratch model's fields left unset.
        seed: a scratch model's initialisation (the caller's RNG is left as it was).

    Returns:
        The CharRNN, computing as spec.compute() says.
    """
    from fedtext.model.checkpoint import checkpoint_vocab, load_checkpoint, resolve_model_spec

    if spec.init == "scratch":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CharRNN(spec.architecture(vocab, defaults), compute=spec.compute())
            if defaults.get("lstm_kernel_init") == "he_normal" and model.config.cell == "lstm":
                he_normal_lstm_kernels_(model)
            return model
    try:
        model, config = load_checkpoint(resolve_model_spec(spec.init), compute=spec.compute())
    except FedtextError as e:
        if spec.init != "pretrained":
            raise
        raise FedtextError(f"{e}; pass --model CHECKPOINT (from `fedtext pretrain` or "
                           "`fedtext convert-keras`) or --model scratch") from None
    if checkpoint_vocab(config) != vocab:
        raise FedtextError(f"{spec.init}: the model's vocabulary ({checkpoint_vocab(config).size}"
                           f" ids) is not the task's ({vocab.size} ids); train it from scratch "
                           "(--model scratch) or pick the model's task")
    return model
