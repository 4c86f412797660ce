"""`mnnn serve` against a real uvicorn on 127.0.0.1 and a free port; every request loop is bounded."""

import concurrent.futures
import os

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from mnnn.deploy.engine import InferenceEngine, Session  # noqa: E402
from mnnn.deploy.server import create_app, running  # noqa: E402
from mnnn.models.lm_baselines import TransformerLM  # noqa: E402
from mnnn.models.s3cmn import S3CMN  # noqa: E402
from tests.harness import greedy_reference  # noqa: E402

V = 64


def tiny_s3cmn():
    torch.manual_seed(0)
    return S3CMN(vocab_size=V, embedding_dim=16, hidden_dim=16, num_layers=1, d_state=4, max_len=64,
                 memory_size=32, memory_top_k=4)


@pytest.fixture(scope="module")
def server():
    engine = InferenceEngine(tiny_s3cmn())
    app = create_app(engine, max_sessions=3, max_new_tokens=16, max_body_bytes=4096)
    with running(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        yield client, engine


def gen(client, **body):
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_greedy_equals_the_models_own_loop(server):
    client, engine = server
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    out = gen(client, prompt_ids=prompt, max_new_tokens=6, temperature=0)
    assert out["token_ids"] == greedy_reference(engine.model, prompt, 6)
    assert out["prompt_tokens"] == len(prompt) and out["time_to_first_token_s"] <= out["latency_s"]


def test_sampling_is_reproducible_with_a_seed_and_stream_gives_the_same_tokens(server):
    client, _ = server
    body = dict(prompt_ids=[1, 2, 3], max_new_tokens=8, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    a, b = gen(client, **body), gen(client, **body)
    assert a["token_ids"] == b["token_ids"]
    events = []
    with client.stream("POST", "/v1/generate", json=dict(body, stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(__import__("json").loads(line[6:]))
    assert [e["token_id"] for e in events[:-1]] == a["token_ids"]
    assert events[-1]["done"] and events[-1]["token_ids"] == a["token_ids"]


def test_a_session_follow_up_equals_a_fresh_request_with_the_whole_history(server):
    client, _ = server
    sid = client.post("/v1/sessions").json()["session_id"]
    first = gen(client, prompt_ids=[5, 6, 7], max_new_tokens=4, temperature=0, session_id=sid)
    second = gen(client, prompt_ids=[8, 9], max_new_tokens=5, temperature=0, session_id=sid)
    history = [5, 6, 7] + first["token_ids"] + [8, 9]
    fresh = gen(client, prompt_ids=history, max_new_tokens=5, temperature=0)
    assert second["token_ids"] == fresh["token_ids"]
    assert second["tokens_seen"] == len(history) + 5  # generated tokens are read into the session too
    # an empty prompt continues the session
    third = gen(client, prompt_ids=[], max_new_tokens=2, temperature=0, session_id=sid)
    assert len(third["token_ids"]) == 2
    assert client.get(f"/v1/sessions/{sid}").json()["tokens_seen"] == second["tokens_seen"] + 2


def test_sessions_are_isolated(server):
    client, _ = server
    a, b = (client.post("/v1/sessions").json()["session_id"] for _ in range(2))
    gen(client, prompt_ids=[1, 2, 3, 4], max_new_tokens=3, temperature=0, session_id=a)
    gen(client, prompt_ids=[9, 9, 9, 9, 9, 9], max_new_tokens=8, temperature=0, session_id=b)  # b's traffic
    after = gen(client, prompt_ids=[10], max_new_tokens=4, temperature=0, session_id=a)
    c = client.post("/v1/sessions").json()["session_id"]  # the same turns as a, without b in between
    gen(client, prompt_ids=[1, 2, 3, 4], max_new_tokens=3, temperature=0, session_id=c)
    alone = gen(client, prompt_ids=[10], max_new_tokens=4, temperature=0, session_id=c)
    assert after["token_ids"] == alone["token_ids"]


def test_least_recently_used_session_is_evicted_and_delete_works(server):
    client, _ = server
    ids = [client.post("/v1/sessions").json()["session_id"] for _ in range(3)]  # max_sessions = 3
    gen(client, prompt_ids=[1], max_new_tokens=1, session_id=ids[0])  # ids[0] is now the most recent
    extra = client.post("/v1/sessions").json()["session_id"]
    assert client.get(f"/v1/sessions/{ids[1]}").status_code == 404  # the least recently used went
    assert client.get(f"/v1/sessions/{ids[0]}").status_code == 200
    assert client.delete(f"/v1/sessions/{extra}").status_code == 204
    assert client.delete(f"/v1/sessions/{extra}").status_code == 404
    r = client.post("/v1/generate", json={"prompt_ids": [1], "session_id": extra})
    assert r.status_code == 404 and r.json()["field"] == "session_id"


@pytest.mark.parametrize("body, status, field", [
    ({}, 422, "prompt"),
    ({"prompt_ids": []}, 422, "prompt"),
    ({"prompt_ids": "1 2 3"}, 422, "prompt_ids"),
    ({"prompt_ids": [1, 2.5]}, 422, "prompt_ids.1"),
    ({"prompt_ids": [V]}, 422, "prompt_ids"),
    ({"prompt_ids": [-1]}, 422, "prompt_ids"),
    ({"prompt_ids": [1], "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"prompt_ids": [1], "max_new_tokens": 17}, 422, "max_new_tokens"),
    ({"prompt_ids": [1], "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ({"prompt_ids": [1], "temperature": -1}, 422, "temperature"),
    ({"prompt_ids": [1], "temperature": "hot"}, 422, "temperature"),
    ({"prompt_ids": [1], "top_k": 0}, 422, "top_k"),
    ({"prompt_ids": [1], "top_p": 1.5}, 422, "top_p"),
    ({"prompt_ids": [1], "stream": "yes"}, 422, "stream"),
    ({"prompt_ids": [1], "session_id": "no-such-session"}, 404, "session_id"),
    ({"prompt_ids": [1], "prompt": "x"}, 422, "prompt"),
    ({"prompt": "text"}, 422, "prompt"),  # this server has no tokenizer
    ({"prompt_ids": [1], "colour": "red"}, 422, "colour"),
    ({"prompt_ids": [1] * 3000}, 413, "body"),  # over max_body_bytes = 4096
])
def test_bad_requests_get_4xx_naming_the_field(server, body, status, field):
    client, _ = server
    r = client.post("/v1/generate", json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field


def test_malformed_json_and_unknown_routes(server):
    client, _ = server
    r = client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()
    assert client.get("/v1/nothing").status_code == 404


def test_a_model_error_is_a_500_without_traceback(server, monkeypatch):
    client, engine = server

    def broken(session, ids):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine, "read", broken)
    r = client.post("/v1/generate", json={"prompt_ids": [1, 2]})
    assert r.status_code == 500
    assert "secret" not in r.text and "Traceback" not in r.text and r.json()["error"]


def test_metrics_parse_and_count(server):
    client, _ = server
    gen(client, prompt_ids=[1, 2, 3, 4, 5, 6], max_new_tokens=3)
    assert client.get("/healthz").json()["status"] == "ok"
    families = {f.name: f for f in prometheus_parser.text_string_to_metric_families(client.get("/metrics").text)}
    for name in ("mnnn_request_latency_seconds", "mnnn_time_to_first_token_seconds", "mnnn_generated_tokens",
                 "mnnn_tokens_per_second", "mnnn_active_sessions", "process_resident_memory_bytes",
                 "mnnn_spike_rate", "mnnn_memory_hit_rate", "mnnn_memory_hit_rate_chance", "mnnn_prompt_perplexity"):
        assert name in families, name
    value = {s.name: s.value for f in families.values() for s in f.samples}
    assert value["mnnn_generated_tokens_total"] >= 3
    assert value["process_resident_memory_bytes"] > 1e6
    assert 0 <= value["mnnn_spike_rate"] <= 1 and 0 <= value["mnnn_memory_hit_rate_chance"] <= 1


def test_concurrent_clients_are_all_served(server):
    client, _ = server

    def one(i):
        return client.post("/v1/generate", json={"prompt_ids": [i % V, 1], "max_new_tokens": 4, "seed": i}).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(16), timeout=120))
    assert codes == [200] * 16


def test_stateless_model_session_keeps_its_history():
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=V, d_model=16, num_layers=1, num_heads=2, max_len=64)
    engine = InferenceEngine(model)
    session = engine.read(Session(), [1, 2, 3])
    first = list(engine.generate(session, 3, temperature=0, keep_state=True))
    engine.read(session, [4, 5])
    follow = list(engine.generate(session, 3, temperature=0))
    fresh = engine.read(Session(), [1, 2, 3] + first + [4, 5])
    assert list(engine.generate(fresh, 3, temperature=0)) == follow
    assert session.tokens_seen == 3 + 3 + 2 + 2  # the last token of a turn without keep_state is not read
    assert session.context == [1, 2, 3] + first + [4, 5] + follow[:-1]


def test_s3cmn_generates_through_its_decoder_as_through_step():
    """The engine's S3CMN path (the lean decoder, state converted for the next prompt and back)
    leaves a session where model.step leaves it: same logits after prompt, generation, prompt."""
    engines = [InferenceEngine(tiny_s3cmn()), InferenceEngine(tiny_s3cmn())]
    assert engines[0].decoder is not None
    engines[1].decoder = None  # model.step for every generated token
    sessions, tokens = [], []
    for engine in engines:
        session = engine.read(Session(), [3, 1, 4, 1, 5])
        tokens.append(list(engine.generate(session, 6, temperature=1.0, seed=3, keep_state=True)))
        engine.read(session, [9, 2, 6])
        sessions.append(session)
    assert tokens[0] == tokens[1]
    torch.testing.assert_close(sessions[0].logits, sessions[1].logits, rtol=1e-5, atol=1e-5)
    assert engines[0].stats()["spike_rate"] == pytest.approx(engines[1].stats()["spike_rate"], abs=1e-6)


@torch.no_grad()
def test_engine_steps_the_model_while_a_datastore_is_attached():
    """A datastore attached mid-session (only model.step reads one): the engine hands the session's
    decoder state back to the model's form and continues exactly as an engine that never decoded."""
    from mnnn.memory.datastore import build_datastore

    engines = [InferenceEngine(tiny_s3cmn()), InferenceEngine(tiny_s3cmn())]
    engines[1].decoder = None
    store = build_datastore(engines[0].model, torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(6)),
                            batch_size=2, seq_len=16)
    logits = []
    for engine in engines:
        session = engine.read(Session(), [3, 1, 4, 1, 5])
        list(engine.generate(session, 4, temperature=0, keep_state=True))
        engine.model.attach_datastore(store)
        assert engine.decoder is None or not engine.decoder.usable
        list(engine.generate(session, 3, temperature=0, keep_state=True))
        logits.append(session.logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_engine_refuses_models_with_shared_buffer_stores():
    model = S3CMN(vocab_size=V, embedding_dim=16, hidden_dim=16, num_layers=1, d_state=4, max_len=64,
                  memory_size=32, memory_fusion="membrane")
    with pytest.raises(ValueError, match="membrane"):
        InferenceEngine(model)


@pytest.mark.skipif(not os.environ.get("MNNN_DATA_DIR"), reason="MNNN_DATA_DIR not set")
def test_text_prompt_with_the_bert_tokenizer():
    from mnnn.data.wikitext import load_tokenizer

    torch.manual_seed(0)
    model = S3CMN(vocab_size=30522, embedding_dim=8, hidden_dim=8, num_layers=1, d_state=4, max_len=64,
                  memory_size=16, memory_top_k=2)
    app = create_app(InferenceEngine(model, load_tokenizer()), max_new_tokens=4)
    with running(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        out = gen(client, prompt="the history of the city", max_new_tokens=4, temperature=0)
    assert out["prompt_tokens"] == 5 and len(out["token_ids"]) == 4 and isinstance(out["text"], str)
