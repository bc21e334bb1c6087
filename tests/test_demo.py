import re
import sys

import numpy as np
import pytest

from fastdescent.demo import contenders, race, recipes, runner, training
from fastdescent.__main__ import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--epochs", "2", "--max-steps", "40", "--hidden", "16", "--batch-size", "64"]


def have(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def block(monkeypatch, *modules):
    """Make ``import module`` fail, as if it were not installed."""
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in modules):
            monkeypatch.delitem(sys.modules, name)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--output", "--sections", "--optimizers", "--epochs", "--seed", "--threads", "--surfaces"):
        assert option in out


@pytest.mark.skipif(not (have("sklearn") and have("matplotlib")), reason="needs the demo extras")
def test_tiny_demo_runs_end_to_end_and_writes_its_pictures(tmp_path, capsys):
    out_dir = tmp_path / "pictures"
    assert main(["demo", *TINY, "--output", str(out_dir), "--surfaces", "ravine", "saddle", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    # the race table: every available method on both surfaces
    for method in contenders.METHODS:
        assert re.search(rf"^\s*(ravine|saddle)?\s+{method}\s", out, re.M), method
    assert "escaped" in out and "yes" in out
    deviation = re.search(r"trace the same path on the ravine: largest difference over \d+ steps = (\S+)", out)
    assert float(deviation.group(1)) < 1e-12
    # the training table: one row per optimizer, kernel and reference runs identical
    names = "|".join(contenders.CONTENDERS)
    section2 = out[out.index("== 2."):out.index("== 3.")]
    rows = [line for line in section2.splitlines() if re.match(rf"^({names})\s+\d", line)]
    assert len(rows) == len(contenders.CONTENDERS)
    for row in rows:
        assert row.split()[-1] == "0", row
        assert row.split()[-2].endswith("x")
    # the pictures
    # section 3: every part ran and the averaged run repeated with the reference backend agrees
    for title in ("3a. Batch size", "3b. Learning-rate schedules", "3c. Momentum", "3d. Reduce the rate",
                  "3e. Weight averaging"):
        assert title in out
    for label in ("full batch", "single samples", "SGDR (T_mult 2)", "triangular2", "one-cycle",
                  "annealed 0.5 -> 0.9", "restored (best)", "SWA (", "EMA ("):
        assert label in out, label
    assert re.search(r"largest difference of any parameter or average = 0$", out, re.M)
    # section 4: every contender with every state storage, and the long runs
    assert "4a. The digits MLP with its state" in out and "4b. 40 steps where rounding decides" in out
    assert re.search(r"^bfloat16 params, float32 master\s", out, re.M)
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted(["surface_ravine.png", "surface_saddle.png", "training_loss.png", "batch_size.png",
                            "schedules.png", "schedules_training.png", "momentum.png", "plateau.png",
                            "averaging.png", "precision_mlp.png", "precision_long.png"])
    for p in out_dir.iterdir():
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000
        assert p.name in out


@pytest.mark.skipif(not have("sklearn"), reason="needs scikit-learn")
def test_without_matplotlib_it_prints_the_tables_and_says_how_to_get_pictures(tmp_path, capsys, monkeypatch):
    block(monkeypatch, "matplotlib")
    out_dir = tmp_path / "none"
    assert main(["demo", *TINY, "--output", str(out_dir), "--surfaces", "beale", "--optimizers", "sgd", "newton"]) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and 'pip install "fastdescent[demo]"' in out
    assert "beale" in out and "held-out acc" in out
    assert not out_dir.exists()


def test_without_scikit_learn_it_says_so_and_still_races(tmp_path, capsys, monkeypatch):
    block(monkeypatch, "sklearn", "matplotlib")
    assert main(["demo", *TINY, "--output", str(tmp_path), "--surfaces", "rosenbrock", "--optimizers", "sgd_momentum"]) == 0
    out = capsys.readouterr().out
    assert "scikit-learn is not installed" in out and "skipping the training" in out
    assert re.search(r"^rosenbrock\s+sgd_momentum\s+\(40\)", out, re.M)


def test_training_is_reproducible_and_backends_agree(capsys):
    """Same seed, same batches and initialization: the kernel and reference runs
    end with bit-identical parameters, and a rerun repeats the numbers."""
    pytest.importorskip("sklearn")
    args = runner.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--epochs", "2", "--hidden", "8", "--seed", "3"])
    data = training.load_digits_split(args.seed)
    progress = None
    momentum = contenders.CONTENDERS["sgd_momentum"]
    first = training.train_once(momentum, "kernel", data, args, progress)
    again = training.train_once(momentum, "kernel", data, args, progress)
    reference = training.train_once(momentum, "reference", data, args, progress)
    for p, q, r in zip(first["model"].params, again["model"].params, reference["model"].params):
        np.testing.assert_array_equal(p, q)
        np.testing.assert_array_equal(p, r)
    assert first["history"].train_loss[1] < first["history"].train_loss[0]
    assert first["held_out_accuracy"] > 0.5


def test_every_surface_has_race_settings_for_every_family():
    families = {c.family for c in contenders.CONTENDERS.values()}
    for name in race.SURFACES:
        assert set(race.RACES[name].lr) == families, name


def test_sections_select_parts(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert main(["demo", "--sections", "momentum", *TINY, "--output", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "3c. Momentum" in out
    for absent in ("== 1.", "== 2.", "3a.", "3b.", "3d.", "3e."):
        assert absent not in out
    if have("matplotlib"):
        assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["momentum.png"]


def test_schedule_catalog_covers_the_issue_and_peaks_at_the_peak_rate():
    catalog = recipes.schedule_catalog(total_steps=300)
    assert list(catalog) == ["constant", "step decay", "exponential", "cosine", "SGDR (T_mult 2)",
                             "triangular", "triangular2", "one-cycle"]
    steps = np.arange(301)
    for name, schedule in catalog.items():
        values = schedule(steps)
        assert np.all(values > 0), name
        assert values.max() == pytest.approx(recipes.PEAK_LR, rel=0.02), name
