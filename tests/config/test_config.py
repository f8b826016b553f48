from pathlib import Path

import pytest

from rayrec.config import ExperimentConfig, build, load_config, parse_cli, parse_override
from rayrec.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_layers_and_overrides(tmp_path):
    (tmp_path / "configs" / "data").mkdir(parents=True)
    (tmp_path / "configs" / "data" / "d.yaml").write_text("data:\n  dataset: ml-100k\n  seed: 3\n")
    exp = tmp_path / "configs" / "exp.yaml"
    exp.write_text("defaults: [data/d]\ndata:\n  seed: 4\ntrain:\n  lr: 1e-2\n")
    cfg = load_config(exp, ["train.batch_size=64", "eval.sampled_ks=[1,2]", "data.root=null"])
    assert cfg.data.dataset == "ml-100k" and cfg.data.seed == 4  # body beats defaults
    assert cfg.train.lr == pytest.approx(0.01) and cfg.train.batch_size == 64
    assert cfg.eval.sampled_ks == [1, 2] and cfg.data.root is None


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lrr=1", "train.lrr"),
        ("train.lr=abc", "train.lr"),
        ("model.dim=2.5", "model.dim"),
        ("data.split=foo", "data.split"),
        ("eval.sampled_ks=[5,x]", "eval.sampled_ks[1]"),
        ("ray.num_workers=-1", "num_workers"),
        ("nope=1", "nope"),
        ("train.max_epochs=true", "train.max_epochs"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(REPO / "configs/experiments/citeulike__bpr_demo.yaml", [override])


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("model:\n  name: bpr\n  dims: 20\n")
    with pytest.raises(ConfigError, match="model.dims"):
        load_config(p)


def test_parse_cli_and_override_forms():
    cfg, _ = parse_cli(["--config", str(REPO / "configs/experiments/citeulike__bpr_demo.yaml"), "ray.num_workers=1"])
    assert cfg.ray.num_workers == 1 and cfg.model.dim == 20
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    with pytest.raises(ConfigError):
        parse_override("no_equals")


def test_roundtrip_dict():
    cfg = load_config(REPO / "configs/experiments/citeulike__bpr_demo.yaml")
    assert build(ExperimentConfig, cfg.to_dict()) == cfg


def test_every_yaml_under_configs_loads():
    """Run configs load as experiments; pipeline and tune files load with their own loaders
    (which build every stage's / the base trial's experiment config and check the search space)."""
    from rayrec.pipeline import load_pipeline, stage_config
    from rayrec.tune import check_space, load_spec, trial_config

    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) >= 8
    kinds = {"pipelines": 0, "tune": 0, "run": 0}
    for f in files:
        kind = f.relative_to(REPO / "configs").parts[0]
        if kind == "pipelines":
            pc = load_pipeline(f)
            stage_config(pc, pc.teacher)
            stage_config(pc, pc.teacher, pc.rank)
            for spec in pc.students:
                stage_config(pc, pc.student, spec)
        elif kind == "tune":
            # the space and metric are checked without teacher artifacts (the job needs them, this test not)
            spec = load_spec(f, ["distill.method=none"])
            check_space(spec)
            trial_config(spec, {})
        else:
            kind = "run"
            load_config(f)
        kinds[kind] += 1
    assert all(kinds.values()), kinds
