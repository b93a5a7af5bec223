import pandas as pd
import pytest

from magicseg.core.config import PromptsParams
from magicseg.core.vocabulary import build_vocabulary
from magicseg.prompts.base import PromptRequest
from magicseg.prompts.counterfactual import make_counterfactual, mentions, plural
from magicseg.prompts.stage import plan_requests, run_prompts
from magicseg.prompts.template import TemplateWriter


@pytest.mark.parametrize(
    "text, names, expected",
    [
        ("A red kite over a lake", ["red kite"], "nothing over a lake"),
        ("Two School Buses and a school bus's door", ["school bus"], "nothing and nothing door"),
        ("three people near a person", ["person"], "nothing near nothing"),
        ("mice chase a mouse", ["mouse"], "nothing chase nothing"),
        ("a bus near the school bus", ["school bus", "bus"], "nothing near nothing"),
        ("a busy street with a bus", ["bus"], "a busy street with nothing"),
        ("several boxes, glasses and a box", ["box"], "nothing, glasses and nothing"),
        ("a pair of skis beside the ski", ["skis"], "nothing beside nothing"),
        ("cherries and a cherry", ["cherry"], "nothing and nothing"),
        ("An Owl. OWLS!", ["owl"], "nothing. nothing!"),
        ("a school bus-stop sign", ["bus"], "a school bus-stop sign"),
        (
            "A tiny striped red ball beside a dotted teal box",
            ["striped red ball", "dotted teal box"],
            "A tiny nothing beside nothing",
        ),
        ("a red ball near a striped red ball", ["striped red ball"], "a red ball near nothing"),
        ("two dotted magenta boxes", ["dotted magenta box"], "nothing"),
    ],
)
def test_counterfactual_replaces_every_mention(text, names, expected):
    assert make_counterfactual(text, names) == expected
    for n in names:
        assert not mentions(make_counterfactual(text, names), n)


def test_plural():
    assert [plural(w) for w in ["bus", "box", "cherry", "day", "knife", "tomato", "kite"]] == [
        "buses",
        "boxes",
        "cherries",
        "days",
        "knives",
        "tomatoes",
        "kites",
    ]


def test_template_writer_rich_is_varied_and_mentions_classes():
    w = TemplateWriter("rich")
    [out] = w.write([PromptRequest(("red kite", "blue ball"), 20, seed=5)])
    assert len(out) == 20 and len(set(out)) == 20
    assert all(mentions(t, "red kite") and mentions(t, "blue ball") for t in out)
    assert w.write([PromptRequest(("red kite", "blue ball"), 20, seed=5)])[0] == out
    assert all(len(t.split()) > 15 for t in out)


def test_every_catalogue_class_prompted_and_removed():
    vocab = build_vocabulary("procedural")
    w = TemplateWriter("rich")
    outs = w.write([PromptRequest((n,), 3, seed=i) for i, n in enumerate(vocab.display)])
    for name, texts in zip(vocab.display, outs, strict=True):
        for text in texts:
            cf = make_counterfactual(text, [name])
            assert mentions(text, name) and not mentions(cf, name) and "nothing" in cf
            # no word of the name is left behind ("striped" of "striped red ball")
            assert not set(name.split()) & set(cf.lower().replace(",", " ").split()) - {
                "red",  # scene phrases of the grammar: "cracked red rocks", "cool blue dusk"
                "blue",
            }, (name, cf)


def test_template_writer_plain():
    [out] = TemplateWriter("plain").write([PromptRequest(("owl",), 3, seed=1)])
    assert out == ["a photo of an owl"] * 3


def test_plan_requests_balanced_and_trainable_only():
    vocab = build_vocabulary("procedural", holdout_combination=8, holdout_novel_words=2)
    for requests in (150, 300, 437):
        params = PromptsParams(requests=requests, two_class_fraction=0.5)
        plans = plan_requests(vocab, params, seed=0)
        uses = pd.Series([i for p in plans for i in p]).value_counts()
        # every trainable class appears as often as any other, give or take one
        assert uses.max() - uses.min() <= 1
        assert len(uses) == min(len(vocab.trainable), uses.sum())
        used = {i for p in plans for i in p}
        assert used.isdisjoint(vocab.holdout)
        assert all(len(set(p)) == len(p) for p in plans)
        assert 0.4 < sum(len(p) == 2 for p in plans) / len(plans) < 0.6
    # more requests keep the earlier ones
    assert (
        plan_requests(vocab, PromptsParams(requests=150), 0)
        == plan_requests(vocab, PromptsParams(requests=300), 0)[:150]
    )


def test_run_prompts_manifest(tmp_path):
    vocab = build_vocabulary("procedural", holdout_combination=4)
    params = PromptsParams(requests=6, per_request=3)
    frame = run_prompts(vocab, params, 0, tmp_path / "p", tmp_path / "m.json")
    again = run_prompts(vocab, params, 0, tmp_path / "q")
    pd.testing.assert_frame_equal(frame, again)
    assert len(frame) == 18 and frame["id"].is_unique and frame["seed"].is_unique
    for row in frame.itertuples():
        assert [vocab.display[i - 1] for i in row.class_ids] == list(row.class_names)
        assert "nothing" in row.cf_prompt
        assert not any(mentions(row.cf_prompt, c) for c in row.class_names)
    more = run_prompts(vocab, params.model_copy(update={"requests": 8}), 0, tmp_path / "r")
    # growing the dataset keeps the earlier prompts and seeds
    pd.testing.assert_frame_equal(more.iloc[:18].reset_index(drop=True), frame)
