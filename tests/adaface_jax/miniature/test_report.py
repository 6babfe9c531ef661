"""The study's verdicts from hand-made runs: the gate first, then the paired tests."""
import numpy as np

from adaface_jax.miniature import report


# --- the decision rules on hand-made runs ----------------------------------------------------------------------

def _fake_result(effect, scaler_gap, acc_degraded=0.1, seeds=6, ids=20, probes=4):
    """Study records as the runner writes them, with a chosen AdaFace-minus-CosFace effect and scaler spread."""
    r = np.random.default_rng(0)
    labels = np.repeat(np.arange(ids), probes).tolist()
    runs = []
    for seed in range(seeds):
        for arm in ("adaface", "cosface", "oracle"):
            rate = 0.4 + (effect if arm != "cosface" else 0.0) + r.normal(0, 0.01)
            correct = (r.random(len(labels)) < rate).astype(int).tolist()
            gap = scaler_gap if arm == "adaface" else 0.8
            probe = {"spearman": 0.3, "grad_share": [0.2, 0.3, 0.5], "acc_degraded": acc_degraded, "acc_clean": 0.5,
                     "norm_degraded": 10.0, "norm_clean": 12.0}
            if arm != "cosface":
                probe["scaler"] = [-gap / 2, 0.0, gap / 2]
            runs.append({"arm": arm, "seed": seed, "gate_step": 5, "batch_digest": f"b{seed}",
                         "init_digest": f"i{seed}", "train_s": 1.0, "history": {"loss": [1.0] * 10},
                         "probes": [{"step": s, **probe} for s in (0, 5, 10)],
                         "correct": {"degraded": correct, "clean": [1] * 10}, "rank1_degraded": float(np.mean(correct)),
                         "rank1_clean": 1.0, "tar_degraded": 0.3 + r.normal(0, 0.01), "tar_clean": 0.9,
                         "claim1": {m: {"norm": 0.5 + r.normal(0, 0.02), "p_true": 0.2 + r.normal(0, 0.02)}
                                    for m in ("train", "eval")}})
    study = {"alpha": 0.05, "power": 0.8, "bootstrap": 500, "gate_min_gap": 0.4, "hard_max_ratio": 0.5, "far": 0.01,
             "primary": "rank1_degraded adaface - cosface", "control": "rank1_degraded oracle - cosface",
             "secondary": ["tar_degraded adaface - cosface", "rank1_degraded adaface - arcface"]}
    return {"runs": runs, "config": {"study": study}, "data": {"degraded_probe_labels": labels,
                                                               "clean_probe_labels": list(range(10))}}


def test_a_failed_gate_is_said_first_and_leaves_only_the_oracle_to_read():
    s = report.summarize(_fake_result(effect=0.1, scaler_gap=0.1))
    assert s["text"].startswith("**Mechanism gate: failed.**") and "only the oracle arm is read" in s["text"]
    verdicts = {v["claim"].split(" (")[0]: v["verdict"] for v in s["verdicts"]}
    assert verdicts["claim 2: the quality-adaptive margin helps on low-quality probes"] == report.NOT_TESTABLE
    assert verdicts["the adaptive margin helps at this scale"] == report.SHOWN  # the oracle is still read
    assert s["checks"] == {"identical_batches": True, "identical_init": True, "seeds_differ": True}


def test_a_passed_gate_with_hard_samples_decides_claim_2_by_the_paired_tests():
    shown = report.summarize(_fake_result(effect=0.1, scaler_gap=0.8))
    assert shown["text"].startswith("**Mechanism gate: passed.**") and shown["gate"]["passed"]
    primary = shown["endpoints"]["primary"]
    assert primary["t_test"]["p"] < 0.05 and primary["bootstrap"]["lower_bound"] > 0
    assert shown["verdicts"][1]["verdict"] == report.SHOWN
    null = report.summarize(_fake_result(effect=0.0, scaler_gap=0.8))
    assert null["verdicts"][1]["verdict"] == report.NOT_SHOWN and "detects" in null["verdicts"][1]["reason"]
    easy = report.summarize(_fake_result(effect=0.1, scaler_gap=0.8, acc_degraded=0.45))
    assert easy["verdicts"][1]["verdict"] == report.NOT_TESTABLE and "not hard" in easy["verdicts"][1]["reason"]
    arcface = shown["endpoints"]["secondary"][1]
    assert arcface["missing"] == ["arcface"] and "no runs of arcface" in shown["text"]
    claim1 = [v for v in shown["verdicts"] if v["claim"].startswith("claim 1")]
    assert [v["verdict"] for v in claim1] == [report.SHOWN, report.SHOWN]  # norm 0.5 against p_y 0.2, both heads
    table = report.table_markdown(shown, 0.01)
    assert "| primary: rank1_degraded adaface - cosface |" in table and "| oracle | 6 |" in table
