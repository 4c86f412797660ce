"""Hugging Face integration: save/load round trip, Auto classes, generate == mnnn's own decoding."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import mnnn  # noqa: E402,F401  (registers the Auto classes)
from mnnn.hf import MnnnForCausalLM, MnnnS3CMNForCausalLM  # noqa: E402
from mnnn.lm import build_model  # noqa: E402
from tests.harness import greedy_reference  # noqa: E402

V = 64
CONFIGS = {
    "s3cmn": {"model": {"name": "s3cmn", "vocab_size": V, "embedding_dim": 16, "hidden_dim": 16, "num_layers": 1,
                        "d_state": 4, "max_len": 64}, "memory": {"memory_size": 32, "memory_top_k": 4}},
    "text_native_ssmn": {"model": {"name": "text_native_ssmn", "vocab_size": V, "embed_dim": 16, "hidden_dim": 16,
                                   "window_size": 8, "num_layers": 2, "num_heads": 2}, "memory": {}},
    "transformer": {"model": {"name": "transformer", "vocab_size": V, "d_model": 16, "num_layers": 1,
                              "num_heads": 2, "max_len": 64}, "memory": {}},
    "lstm": {"model": {"name": "lstm", "vocab_size": V}, "memory": {}},
}


def built(name):
    torch.manual_seed(0)
    return build_model(CONFIGS[name]).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_pretrained_from_pretrained_round_trip_is_bitwise(tmp_path, name):
    model = built(name)
    hf = MnnnForCausalLM.from_mnnn(model, CONFIGS[name])
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == f"mnnn_{name}"
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back).__name__.startswith("Mnnn") and not back.training
    mine = dict(model.named_parameters()) | dict(model.named_buffers())
    theirs = dict(back.lm.named_parameters()) | dict(back.lm.named_buffers())
    assert set(mine) == set(theirs)
    for key, value in mine.items():  # non-saved buffers (Hyena's positions) are recomputed exactly
        assert torch.equal(value, theirs[key]), key
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids, model.init_state(1))[0])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_greedy_generate_equals_mnnn_decoding(tmp_path, name):
    model = built(name)
    MnnnForCausalLM.from_mnnn(model, CONFIGS[name]).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    prompt = [3, 1, 4, 1, 5, 9]
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert out[0, len(prompt):].tolist() == greedy_reference(model, prompt, 12)


def test_generate_samples_with_temperature_top_k_top_p():
    hf = MnnnForCausalLM.from_mnnn(built("s3cmn"), CONFIGS["s3cmn"])
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=8, top_p=0.9)
    torch.manual_seed(1)
    a = hf.generate(torch.tensor([[1, 2, 3]]), **kwargs)
    torch.manual_seed(1)
    b = hf.generate(torch.tensor([[1, 2, 3]]), **kwargs)
    assert a.shape == (1, 13) and torch.equal(a, b) and int(a.max()) < V


def test_forward_loss_and_state_continue_the_stream():
    model = built("s3cmn")
    hf = MnnnForCausalLM.from_mnnn(model, CONFIGS["s3cmn"])
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = hf(ids, labels=ids)
        first = hf(ids[:, :12])
        rest = hf(ids[:, 12:], state=first.state)
        ref = torch.nn.functional.cross_entropy(whole.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert torch.allclose(whole.loss, ref)
    assert torch.allclose(torch.cat([first.logits, rest.logits], 1), whole.logits, atol=1e-5)


def test_padding_and_embeddings_are_refused_with_a_reason():
    hf = MnnnForCausalLM.from_mnnn(built("s3cmn"), CONFIGS["s3cmn"])
    with pytest.raises(ValueError, match="padding"):
        hf(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf(torch.tensor([[1]]), inputs_embeds=torch.zeros(1, 1, 16))
    with pytest.raises(ValueError, match="no Hugging Face wrapper"):
        MnnnForCausalLM.from_mnnn(built("s3cmn"), {"model": {"name": "amrc"}})


@pytest.mark.parametrize("order", ["mnnn first", "transformers first"])
def test_import_mnnn_registers_the_auto_classes(tmp_path, order):
    MnnnForCausalLM.from_mnnn(built("s3cmn"), CONFIGS["s3cmn"]).save_pretrained(tmp_path)
    imports = ["import mnnn", "import transformers"] if order == "mnnn first" else ["import transformers", "import mnnn"]
    code = "; ".join(imports + [
        "import sys",
        "assert 'transformers' not in sys.modules or True",
        "from transformers import AutoModelForCausalLM",
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})",
        "print(type(m).__name__)"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith(MnnnS3CMNForCausalLM.__name__)


def test_import_mnnn_does_not_import_transformers():
    code = "import sys, mnnn; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.skipif(not os.environ.get("MNNN_DATA_DIR"), reason="MNNN_DATA_DIR not set")
def test_tokenizer_and_text_generation_pipeline_offline(tmp_path):
    from transformers import AutoTokenizer, pipeline

    from mnnn.data.wikitext import load_tokenizer
    from mnnn.hf import save_tokenizer

    cfg = {"model": dict(CONFIGS["s3cmn"]["model"], vocab_size=30522, embedding_dim=8, hidden_dim=8),
           "memory": CONFIGS["s3cmn"]["memory"]}
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    MnnnForCausalLM.from_mnnn(model, cfg).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "the history of the city"
    assert tok(text)["input_ids"] == load_tokenizer().encode(text, add_special_tokens=False).ids
    generator = pipeline("text-generation", model=str(tmp_path))
    out = generator(text, max_new_tokens=5, do_sample=False, return_tensors=True)
    ids = tok(text)["input_ids"]
    assert out[0]["generated_token_ids"] == ids + greedy_reference(model, ids, 5)
