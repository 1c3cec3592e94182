"""Mixtures: Appendix B lists, mini counterparts on real data, zero-shot guarantees."""

from __future__ import annotations

import copy

import pytest
from hydra import compose, initialize_config_dir

from flix.data import reader
from flix.data.mixture_files import CONF_DIR, load_mixture, load_mixture_by_name, mixture_names
from flix.data.mixtures import KINDS, VARIANTS, Mixture, MixtureError
from flix.pipeline.methods import METHODS, kind_ranks, load_method

EXPECTED = {
    "study_a",
    "zeroshot_sp",
    "multilingual_ner",
    "multilingual_semantic_parsing",
    "multilingual_qa_in_lang",
    "multilingual_qa_cross_lang",
    "multitask_sw",
    "multitask_bn",
}

# Appendix B, copied from the paper as literal lists.
B_NER = "am bm bbj ee ha ig rw lg luo mos ny pcm sn sw tn tw wo xh yo zu".split()
B_SP = "am be bn fi ha hu ja pt_br ru sw ta tr yo zu de_localized en de es fr hi th".split()
B_QA_IN = "ar bn fi id ko ru sw te en".split()
B_QA_CROSS = "ar bn fi ko ru te as bho brx gbm gom gu hi hne kn mai ml mni mr mwr or pa ps sa ta ur".split()
B31_MT = "id es hi yo ja lg ny ru be ar de bn fr tr ig th fi zu te ko sw xh hu ha sn ta am".split()
B43_UNSEEN = "bho brx gbm gom hne mai mni mr mwr sa as gu kn ml or pa ps ur".split()
B44_HELD_OUT = "am be bn ha sw ta yo zu th".split()
B41_SP = "fi hu ja pt_br ru tr de_localized en de es fr hi".split()


def load(name: str, variant: str) -> Mixture:
    return load_mixture_by_name(name, variant)


def all_mixtures() -> list[tuple[str, str]]:
    return [(name, variant) for name in sorted(EXPECTED) for variant in VARIANTS]


def eval_set(mixture: Mixture, name: str):
    return next(s for s in mixture.eval_sets if s.name == name)


def test_every_mixture_file_exists():
    assert set(mixture_names()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hydra_composes_the_group(name):
    overrides = [f"+mixture={name}"]
    with initialize_config_dir(config_dir=str(CONF_DIR.parent), version_base=None):
        cfg = compose(overrides=overrides)
    for variant in VARIANTS:
        assert load_mixture(cfg.mixture, variant).name == name


@pytest.mark.parametrize(("name", "variant"), all_mixtures())
def test_mixture_structure(name, variant):
    m = load(name, variant)
    assert m.kind in ("multitask", "multilingual", "joint") and m.eval_sets and m.notes
    assert sum(kind_ranks(m.kind).values()) == 6  # the paper's active rank
    assert m.features() == {"task": m.tasks, "lang": m.languages}
    assert all(s.zero_shot or set(s.langs) <= set(m.train[s.task]) for s in m.eval_sets)
    assert len(m.train_datasets) == len(set(m.train_datasets))
    assert m.summary().startswith(f"mixture {name} [{variant}]")


@pytest.mark.needs_mini  # every language of each mixture's mini variant
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_mini_variant_reads_real_data(name, data_root):
    m = load(name, "mini")
    m.check(data_root)
    for task, split, lang in m.required_files():
        assert reader.read_dataset(data_root, task, split, lang, limit=2), (task, split, lang)


def test_study_a_official_is_appendix_b():
    m = load("study_a", "official")
    assert m.kind == "joint"
    assert m.train == {
        "semantic_parsing": B_SP,
        "qa_in_lang": B_QA_IN,
        "qa_cross_lang": ["ar", "bn", "fi", "ko", "ru", "te"],
        "ner": B_NER,
        "translation": B31_MT,
    }
    assert len(m.train["ner"]) == 20 and len(B43_UNSEEN) == 18
    assert eval_set(m, "qa_cross_lang_unseen_comb").langs == ["hi", "ta"]
    unseen = eval_set(m, "qa_cross_lang_unseen_lang")
    assert unseen.langs == B43_UNSEEN and unseen.zero_shot == "unseen_language"
    assert "translation" not in {s.task for s in m.eval_sets}


def test_zeroshot_sp_official_is_appendix_b():
    m = load("zeroshot_sp", "official")
    assert m.train["semantic_parsing"] == B41_SP
    assert m.train["qa_cross_lang"] == B_QA_CROSS and m.train["ner"] == B_NER
    assert len(m.train["translation"]) == 57  # B.4.1's 58 minus en (no en2en in XTREME-UP)
    assert "en" not in m.train["translation"]
    (only,) = m.eval_sets
    assert only.task == "semantic_parsing" and only.langs == B44_HELD_OUT
    assert only.zero_shot == "unseen_combination"
    assert set(B44_HELD_OUT) <= set(m.train["translation"])


def test_study_b_official_is_appendix_b():
    assert load("multilingual_ner", "official").train == {"ner": B_NER}
    assert load("multilingual_semantic_parsing", "official").train == {"semantic_parsing": B_SP}
    assert load("multilingual_qa_in_lang", "official").train == {"qa_in_lang": B_QA_IN}
    assert load("multilingual_qa_cross_lang", "official").train == {"qa_cross_lang": B_QA_CROSS}
    sw, bn = load("multitask_sw", "official"), load("multitask_bn", "official")
    assert sw.train == {"semantic_parsing": ["sw"], "ner": ["sw"], "qa_in_lang": ["sw"]}
    assert bn.train == {"semantic_parsing": ["bn"], "qa_in_lang": ["bn"], "qa_cross_lang": ["bn"]}
    assert sw.kind == bn.kind == "multitask"
    assert {load(f"multilingual_{t}", "official").kind for t in ("ner", "semantic_parsing", "qa_in_lang", "qa_cross_lang")} == {"multilingual"}


@pytest.mark.needs_mini  # every language of each mixture's mini variant
def test_mini_keeps_every_paper_language_it_has(data_root):
    have = reader.available(data_root)
    for name in EXPECTED:
        official, mini = load(name, "official"), load(name, "mini")
        for task, langs in official.train.items():
            held_out = {lang for s in mini.eval_sets if s.zero_shot == "unseen_language" or (s.zero_shot and s.task == task) for lang in s.langs}
            present = [lang for lang in langs if lang in have[task]["train"]]
            expected = [lang for lang in present if lang not in held_out]
            assert mini.train.get(task, []) == expected, (name, task)


def test_mini_study_a_substitutes():
    m = load("study_a", "mini")
    comb, unseen = (
        eval_set(m, "qa_cross_lang_unseen_comb"),
        eval_set(m, "qa_cross_lang_unseen_lang"),
    )
    assert comb.langs == ["bn", "te"] and unseen.langs == ["ja"]
    assert not set(comb.langs) & set(m.train["qa_cross_lang"])
    assert "ja" not in m.languages and "ja" not in m.features()["lang"]
    assert load("zeroshot_sp", "mini").eval_sets[0].langs == ["th"]


def test_per_dataset_splits_the_evaluated_training_datasets():
    m = load("study_a", "mini").restrict(2)
    parts = m.per_dataset()
    supervised = {(s.task, lang) for s in m.eval_sets if not s.zero_shot for lang in s.langs}
    assert {p.train_datasets[0] for p in parts} == supervised  # translation is trained, never scored
    for p in parts:
        ((task, lang),) = p.train_datasets
        assert p.name == f"study_a/{task}.{lang}" and p.eval_datasets == [(task, lang)]


BASE = {
    "name": "bad",
    "kind": "joint",
    "mini": {
        "train": {"ner": ["sw", "yo"], "qa_in_lang": ["sw", "bn"], "translation": ["ha"]},
        "eval": [{"name": "ner", "task": "ner"}],
    },
}


def with_eval(*sets: dict) -> dict:
    cfg = copy.deepcopy(BASE)
    cfg["mini"]["eval"] += list(sets)
    return cfg


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"name": "x", "task": "ner", "langs": ["sw"], "zero_shot": "unseen_language"},
            "appear in training",
        ),
        (
            {"name": "x", "task": "ner", "langs": ["yo"], "zero_shot": "unseen_combination"},
            "are in train.ner",
        ),
        (
            {"name": "x", "task": "ner", "langs": ["ja"], "zero_shot": "unseen_combination"},
            "no other train task",
        ),
        (
            {"name": "x", "task": "ner", "langs": ["ha"], "zero_shot": "unseen"},
            "zero_shot must be one of",
        ),
        ({"name": "x", "task": "ner", "langs": ["bn"]}, "not trained on"),
        ({"name": "x", "task": "nerr"}, "give `langs`"),
        ({"name": "x", "task": "nerr", "langs": ["sw"]}, "unknown task 'nerr'"),
        ({"name": "ner", "task": "ner"}, "names repeat"),
    ],
)
def test_validation_errors_name_the_key(extra, message):
    with pytest.raises(MixtureError, match=message) as err:
        load_mixture(with_eval(extra), "mini")
    assert "conf/mixture/bad.yaml" in str(err.value)


def test_valid_zero_shot_sets_pass():
    cfg = with_eval(
        {"name": "c", "task": "ner", "langs": ["bn", "ha"], "zero_shot": "unseen_combination"},
        {"name": "u", "task": "ner", "langs": ["ja"], "zero_shot": "unseen_language"},
    )
    m = load_mixture(cfg, "mini")
    assert m.eval_datasets == [
        ("ner", "sw"),
        ("ner", "yo"),
        ("ner", "bn"),
        ("ner", "ha"),
        ("ner", "ja"),
    ]


def test_unknown_train_task_and_variant():
    cfg = copy.deepcopy(BASE)
    cfg["mini"]["train"]["pos"] = ["sw"]
    with pytest.raises(MixtureError, match=r"train\.pos: unknown task"):
        load_mixture(cfg, "mini")
    with pytest.raises(MixtureError, match=r"missing `official\.train`"):
        load_mixture(BASE, "official")
    with pytest.raises(MixtureError, match="variant"):
        load_mixture(BASE, "full")


@pytest.mark.needs_mini  # the message lists the mini copy's languages
def test_missing_dataset_lists_missing_and_available(data_root):
    cfg = copy.deepcopy(BASE)
    cfg["mini"]["train"]["semantic_parsing"] = ["sw", "de"]
    with pytest.raises(reader.DataError) as err:
        load_mixture(cfg, "mini").check(data_root)
    text = str(err.value)
    assert "semantic_parsing/train/sw.jsonl" in text and "semantic_parsing/train/de.jsonl" not in text
    assert "semantic_parsing: train: de en es fr hi th" in text


@pytest.mark.needs_mini  # the message lists the mini copy's languages
def test_official_variant_on_mini_data_fails_listing_everything(data_root):
    with pytest.raises(reader.DataError) as err:
        load("study_a", "official").check(data_root)
    text = str(err.value)
    for missing in (
        "qa_cross_lang/validation/hi.jsonl",
        "qa_cross_lang/test/bho.jsonl",
        "semantic_parsing/train/am.jsonl",
    ):
        assert missing in text
    assert "qa_cross_lang: train: ar bn fi ja ko ru te" in text


@pytest.mark.parametrize(("name", "variant"), [(n, v) for n in ("study_a", "zeroshot_sp") for v in VARIANTS])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_restrict_keeps_zero_shot_sets(name, variant, n):
    full = load(name, variant)
    small = full.restrict(n)
    assert [(s.name, s.zero_shot) for s in small.eval_sets] == [(s.name, s.zero_shot) for s in full.eval_sets]
    for s in small.eval_sets:
        assert 1 <= len(s.langs) <= n and set(s.langs) <= set(eval_set(full, s.name).langs)
    for task, langs in small.train.items():
        assert set(langs) <= set(full.train[task])  # nothing new, so no held-out language enters
        assert len(langs) <= n + 1  # at most one language pinned back for an unseen combination
    for s in small.eval_sets:
        if s.zero_shot == "unseen_language":
            assert not set(s.langs) & set(small.languages)
        if s.zero_shot == "unseen_combination":
            assert not set(s.langs) & set(small.train[s.task])


def test_restricted_mini_still_reads(data_root):
    load("study_a", "mini").restrict(2).check(data_root)


def test_rank_tables_follow_the_paper_and_cover_every_kind():
    assert kind_ranks("multitask") == {"task": 2, "lang": 4}
    assert kind_ranks("multilingual") == kind_ranks("joint") == {"task": 4, "lang": 2}
    for method in METHODS:
        assert set(load_method(method)["ranks"]) == set(KINDS), method
    with pytest.raises(MixtureError, match="unknown kind 'both'"):
        load_mixture({**BASE, "kind": "both"}, "mini")
