"""Text generation: the tutorial's `generate_text`, streamed one character at a time.

The prompt runs through the model once; each new character is then sampled from
softmax(logits / temperature) (optionally only among the top_k) and fed back with the
recurrent state carried over, so every character costs one time step (CharRNN.generate).
The tutorial re-feeds only the last char to a stateful Keras model; this is the same thing.

Padding and beginning-of-snippet ids are never sampled; a task with an end-of-snippet id
(Reddi et al.'s) shows it as a line break.

Example:
    model, config = load_checkpoint(resolve_model_spec("pretrained"))
    print(generate_text(model, "What of TensorFlow Federated, you ask? ", seed=0))
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fedtext.data.vocab import TUTORIAL, Vocab
from fedtext.errors import FedtextError
from fedtext.model.char_rnn import CharRNN


def prompt_ids(prompt: str, vocab: Vocab = TUTORIAL) -> torch.Tensor:
    """The prompt as (1, T) ids, or a FedtextError naming the characters the model can't read.

    With a beginning-of-snippet id the prompt starts with it, as every training snippet does.
    """
    if not prompt:
        raise FedtextError("the prompt is empty: give the model at least one character to "
                           "start from (e.g. --prompt 'ROMEO:')")
    bad = vocab.unknown_chars(prompt)
    if bad:
        shown = ", ".join(f"{c!r} (x{n})" if n > 1 else repr(c) for c, n in bad.items())
        raise FedtextError(f"the prompt has characters outside the vocabulary: {shown}")
    ids = torch.from_numpy(vocab.encode(prompt).astype("int64"))
    if vocab.bos_id is not None:
        ids = torch.cat([torch.tensor([vocab.bos_id]), ids])
    return ids[None, :]  # (1, T)


def check_sampling(length: int, temperature: float, top_k: int | None) -> None:
    if length < 0:
        raise FedtextError(f"--length must be >= 0, not {length}")
    if not temperature >= 0:  # also refuses NaN
        raise FedtextError(f"--temperature must be >= 0 (0 = always the likeliest char), "
                           f"not {temperature}")
    if top_k is not None and top_k < 1:
        raise FedtextError(f"--top-k must be >= 1, not {top_k}")


def stream_text(model: CharRNN, prompt: str, length: int = 200, temperature: float = 1.0,
                top_k: int | None = None, seed: int | None = None,
                vocab: Vocab = TUTORIAL) -> Iterator[str]:
    """Yield `length` generated characters after `prompt`, one at a time.

    Args:
      model: the CharRNN.
      prompt: text to start from; every character must be in the vocabulary.
      length: how many characters to generate.
      temperature: divides the logits: < 1 is more conservative, > 1 wilder; 0 is greedy.
      top_k: sample only among the k likeliest characters.
      seed: the same seed gives the same text; None draws a fresh one.
      vocab: the model's vocabulary (its checkpoint's).
    Yields:
      One character per step (OOV is shown as U+FFFD; PAD and BOS are never sampled).
    """
    check_sampling(length, temperature, top_k)
    if vocab.size != model.config.vocab_size:
        raise FedtextError(f"the vocabulary has {vocab.size} ids, the model "
                           f"{model.config.vocab_size}")
    dev = next(model.parameters()).device
    idx = prompt_ids(prompt, vocab).to(dev)
    itos = vocab.itos
    if vocab.eos_id is not None:
        itos[vocab.eos_id] = "\n"
    banned = tuple(i for i in (vocab.pad_id, vocab.bos_id) if i is not None)
    gen = torch.Generator(device=dev)  # the same seed gives the same text per device type
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    model.eval()
    for nxt in model.generate(idx, length, temperature=temperature, top_k=top_k, generator=gen,
                              banned=banned):
        yield itos[int(nxt[0])]  # nxt: (1,)


def generate_text(model: CharRNN, prompt: str, length: int = 200, temperature: float = 1.0,
                  top_k: int | None = None, seed: int | None = None,
                  vocab: Vocab = TUTORIAL) -> str:
    """The prompt followed by `length` generated characters (see stream_text)."""
    return prompt + "".join(stream_text(model, prompt, length, temperature, top_k, seed, vocab))
