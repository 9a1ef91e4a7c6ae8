"""Text generation: determinism per seed, state carrying, sampling knobs, prompt errors."""

import pytest
import torch

from fedtext.data.vocab import ITOS, PAD_ID, encode
from fedtext.errors import FedtextError
from fedtext.model.char_rnn import CharRNN, ModelConfig
from fedtext.model.generate import generate_text, stream_text

PROMPT = "What of TensorFlow Federated, you ask? "


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(embed_dim=8, hidden_size=16))
    with torch.no_grad():  # livelier logits than the init, so samples spread out
        m.head.weight.mul_(8)
    return m.eval()


def test_same_seed_same_text_other_seed_other_text(model):
    a = generate_text(model, PROMPT, 80, seed=1)
    assert a == generate_text(model, PROMPT, 80, seed=1)
    assert a.startswith(PROMPT) and len(a) == len(PROMPT) + 80
    assert a != generate_text(model, PROMPT, 80, seed=2)
    assert ITOS[PAD_ID] not in a


def test_stream_yields_the_same_characters_one_at_a_time(model):
    chars = list(stream_text(model, PROMPT, 30, seed=5))
    assert all(len(c) == 1 for c in chars) and len(chars) == 30
    assert PROMPT + "".join(chars) == generate_text(model, PROMPT, 30, seed=5)


def test_greedy_carries_the_state(model):
    # Temperature 0 (and top_k=1) is greedy; carrying the state must give what re-running the
    # whole text through the model from scratch gives at every step.
    text = generate_text(model, PROMPT, 25, temperature=0, seed=1)
    assert text == generate_text(model, PROMPT, 25, temperature=0, seed=2)
    assert text == generate_text(model, PROMPT, 25, top_k=1, seed=3)
    ref = PROMPT
    with torch.no_grad():
        for _ in range(25):
            logits, _ = model.run(torch.from_numpy(encode(ref).astype("int64"))[None])
            logits[0, -1, PAD_ID] = -float("inf")
            ref += ITOS[int(logits[0, -1].argmax())]
    assert text == ref


def test_top_k_limits_the_choices(model):
    with torch.no_grad():
        logits, _ = model.run(torch.from_numpy(encode(PROMPT).astype("int64"))[None])
    top3 = {ITOS[i] for i in logits[0, -1].topk(3).indices.tolist()}
    firsts = {next(stream_text(model, PROMPT, 1, temperature=2.0, top_k=3, seed=s))
              for s in range(40)}
    assert firsts <= top3 and len(firsts) > 1


def test_prompt_errors_name_the_characters(model):
    with pytest.raises(FedtextError, match="'\u00e9'.*'\u2014'|'\u2014'.*'\u00e9'"):
        generate_text(model, "caf\u00e9 \u2014 bar", 5, seed=0)
    with pytest.raises(FedtextError, match="empty"):
        generate_text(model, "", 5, seed=0)
    with pytest.raises(FedtextError, match="--temperature"):
        generate_text(model, "a", 5, temperature=-1, seed=0)
    with pytest.raises(FedtextError, match="--top-k"):
        generate_text(model, "a", 5, top_k=0, seed=0)
