"""The comparison with a baseline: which metrics, in what order, and when a drop warns."""

from __future__ import annotations

from jobs.evaluation.baseline import Delta, compare, drift_warnings, metric_label


def test_compared_metrics_are_the_headline_and_single_modality_ones_headline_first():
    after = {
        "zeroshot_cosine_audio_top1": 60.0,
        "cosine_video_t2i_r1": 40.0,
        "cosine_aligned_video_t2i_r1": 40.0,
        "volume_t2i_r5": 90.0,
        "volume_t2i_medr": 1.0,
        "zeroshot_top1": 80.0,
        "volume_t2i_r1": 50.0,
        "cosine_audio_i2t_r1": 30.0,
        "only_after": 1.0,
    }
    before = {k: v - 1 for k, v in after.items() if k != "only_after"}
    deltas = compare(after, before)
    assert [d.metric for d in deltas] == [
        "volume_t2i_r1",
        "zeroshot_top1",
        "cosine_audio_i2t_r1",
        "cosine_video_t2i_r1",
        "zeroshot_cosine_audio_top1",
    ]
    assert all(d.change == 1.0 for d in deltas)
    assert metric_label("cosine_audio_i2t_r1") == "audio -> text R@1, cosine"
    assert metric_label("zeroshot_cosine_audio_top1") == (
        "zero-shot classification top-1, cosine (audio)"
    )
    assert metric_label("cosine_aligned_audio_t2i_r1") is None


def test_only_a_drop_beyond_drift_points_warns_and_cosine_drops_name_the_remedy():
    deltas = [
        Delta("volume_t2i_r1", 50.0, 45.0),  # exactly the limit: no warning
        Delta("volume_i2t_r1", 50.0, 44.9),
        Delta("cosine_audio_t2i_r1", 42.0, 24.0),
        Delta("cosine_video_t2i_r1", 40.0, 70.0),
    ]
    warnings = drift_warnings(deltas, drift_points=5.0, baseline="models:/gram/3")
    assert len(warnings) == 2
    volume, audio = warnings
    assert volume.startswith("(video+audio) -> text R@1, volume fell 5.1 points against")
    assert "loss.cosine_weight" not in volume
    assert audio.startswith(
        "text -> audio R@1, cosine fell 18.0 points against the baseline models:/gram/3 "
        "(42.0 -> 24.0; more than drift_points=5)"
    )
    assert "loss.cosine_weight > 0" in audio
    assert drift_warnings(deltas, drift_points=20.0, baseline="x") == []
    assert "-18.00" in deltas[2].line()
