"""Schedules, plateau rules and averagers driving the optimizer objects, and their
place in the optimizer checkpoint: a resumed run continues exactly."""

import numpy as np
import pytest

import fastdescent as fd
from fastdescent import schedules as S
from support import assert_bitwise_equal, random_array


class Run:
    """A small noisy least-squares problem trained with every helper of this feature."""

    def __init__(self, rng_seed):
        data = np.random.default_rng(rng_seed)
        self.A = data.standard_normal((40, 30))
        self.b = data.standard_normal(40)
        self.w = [data.standard_normal(30).astype(np.float64), data.standard_normal(7).astype(np.float32)]
        self.noise = np.random.default_rng(rng_seed + 1)
        self.opt = fd.SGD([{"params": [self.w[0]]}, {"params": [self.w[1]], "lr": 0.02}], lr=0.01, momentum=0.5)
        self.lr = fd.Scheduler(self.opt, [S.warmup(S.cosine(0.01, 200, 1e-4), 10),
                                          S.warmup(S.constant(0.02), 10)])
        self.momentum = fd.Scheduler(self.opt, S.linear(0.5, 0.9, 50), "momentum")
        self.plateau = fd.ReduceLROnPlateau(self.lr, patience=2, factor=0.5, threshold=1e-3)
        self.stopper = fd.EarlyStopping(self.opt, patience=20, restore_best=True)
        self.swa = fd.SWA(self.opt, start=20, every=5)
        self.ema = fd.EMA(self.opt, decay=0.95, warmup=True)
        for name in ("lr", "momentum", "plateau", "stopper", "swa", "ema"):
            self.opt.register_state(name, getattr(self, name))

    def loss(self):
        r = self.A @ self.w[0] - self.b
        return 0.5 * float(r @ r) + float(np.sum(self.w[1].astype(np.float64) ** 2))

    def train(self, steps):
        record = []
        for _ in range(steps):
            g0 = self.A.T @ (self.A @ self.w[0] - self.b) + self.noise.standard_normal(30)
            g1 = (2 * self.w[1] + self.noise.standard_normal(7)).astype(np.float32)
            self.opt.step([g0, g1])
            self.lr.step()
            self.momentum.step()
            self.swa.step()
            self.ema.step()
            if self.lr.last_step % 5 == 0:
                loss = self.loss()
                stop = self.stopper.step(loss)
                reduced = self.plateau.step(loss)
                record.append(("evaluation", loss, stop, reduced))
            record.append(("hyperparameters", *(g["lr"] for g in self.opt.param_groups),
                           self.opt.param_groups[0]["momentum"]))
        return record


def assert_same_run(a, b):
    for x, y in zip(a.w, b.w):
        assert_bitwise_equal(x, y)
    for name in ("lr", "momentum", "plateau", "stopper", "swa", "ema"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            if key in ("averages", "best_params"):
                for x, y in zip(sa[key], sb[key], strict=True):
                    assert_bitwise_equal(x, y, f"{name}.{key}")
            else:
                assert sa[key] == sb[key], (name, key)


@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_checkpoint_resumes_schedules_plateau_and_averages_exactly(via, tmp_path):
    straight = Run(7)
    first_half = straight.train(60)
    resumed = Run(7)
    resumed.train(60)  # same noise stream position as `straight`
    if via == "file":
        straight.opt.save(tmp_path / "ckpt.npz")
    else:
        saved = straight.opt.state_dict()
    fresh = Run(7)
    fresh.noise = resumed.noise
    if via == "file":
        fresh.opt.load(tmp_path / "ckpt.npz")
    else:
        fresh.opt.load_state_dict(saved)
        for p, q in zip(fresh.w, straight.w):
            p[...] = q
    assert_same_run(straight, fresh)
    assert fresh.lr.last_step == 60 and fresh.swa.n_averaged == 9 and fresh.ema.n_averaged == 60
    second_half = straight.train(80)
    assert fresh.train(80) == second_half
    assert_same_run(straight, fresh)
    evaluations = [r for r in first_half + second_half if r[0] == "evaluation"]
    assert any(reduced for _, _, _, reduced in evaluations), "the plateau rule never acted"
    assert straight.opt.param_groups[1]["lr"] < 0.02


def test_beta1_schedule_drives_adam(rng):
    if not hasattr(fd.rules, "adam_step"):
        pytest.skip("the Adam kernel is not on this branch yet")
    w = random_array(rng, 100, np.float32)
    opt = fd.Adam([w], lr=1e-2)
    beta1 = fd.Scheduler(opt, S.cyclic(0.95, 0.85, step_size_up=3), "beta1")
    lr = fd.Scheduler(opt, S.cyclic(1e-3, 1e-2, step_size_up=3))
    seen = []
    for _ in range(6):
        opt.step([random_array(rng, 100, np.float32)])
        lr.step()
        beta1.step()
        seen.append(opt.param_groups[0]["betas"])
    assert [b[1] for b in seen] == [0.999] * 6
    assert [round(b[0], 6) for b in seen] == [0.916667, 0.883333, 0.85, 0.883333, 0.916667, 0.95]


def test_swa_with_the_swa_learning_rate(rng):
    """The SWA recipe: main schedule, then the SWALR-like anneal, averaging meanwhile."""
    w = random_array(rng, 2000, np.float64)
    opt = fd.SGD([w], lr=0.5)
    start = 100
    main = S.cosine(0.5, start)
    sched = fd.Scheduler(opt, S.join([main, S.swa_anneal(main(start), 0.05, anneal_steps=5)], [start]))
    swa = fd.SWA(opt, start=start + 5, every=1)
    for _ in range(300):
        opt.step([w - 1.0 + 0.5 * rng.standard_normal(2000)])
        sched.step()
        swa.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert swa.n_averaged == 300 - start - 4
    # The average of the noisy iterates is closer to the optimum than the last
    # iterate (the ratio is 0.42 +- 0.01 over seeds at this size).
    with swa.swapped():
        averaged_error = np.linalg.norm(w - 1.0)
    assert averaged_error < 0.6 * np.linalg.norm(w - 1.0)
