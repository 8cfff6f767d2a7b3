"""jobs.evaluate: metrics against a naive recomputation, and the real job on the 2-node Ray
cluster with shards and checkpoint on S3, logging to a real MLflow server."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from gram.config import load_config
from gram.decode import DecodeConfig, collate, decode_sample
from gram.synthetic import SyntheticClips
from gram.weights import load_checkpoint
from jobs.evaluation.embedding import ParallelConfig
from jobs.evaluation.scoring import ClassificationConfig, EvalConfig, ModelFiles, evaluate_files
from pipelines.samples_to_shards import write_sample_shards
from pipelines.storage import S3Config
from tests.jobs.conftest import EVAL_CLIPS, SYNTHETIC_CLASSES, checkpoint_of_run, training_run

REPO = Path(__file__).resolve().parents[3]
PNG = b"\x89PNG\r\n\x1a\n"

CLASSIFY = ClassificationConfig(
    label_fields=["color", "sound"],
    prompts=["a {color} square and a {sound}", "{color} square with {sound} sound"],
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def local_result(checkpoints, eval_shards, tmp_path_factory):
    """The evaluation library in this process (no Ray) on the trained tiny model."""
    section = EvalConfig(
        shards=eval_shards, parallel=ParallelConfig(local=True), classification=CLASSIFY
    )
    files = ModelFiles(weights=checkpoints.good / "model.safetensors", source="good")
    return evaluate_files(files, section, S3Config(), tmp_path_factory.mktemp("local-eval"))


def _naive_volume(vectors: list[torch.Tensor]) -> float:
    """sqrt(det G) of the Gram matrix of the given unit vectors, in float64."""
    m = torch.stack([v.double() for v in vectors])  # [k, D]
    return float(torch.linalg.det(m @ m.T).clamp_min(0).sqrt())


def _ranks(scores: torch.Tensor, gt: list[int]) -> list[int]:
    """1-based rank of each row's ground truth; ties count against it."""
    return [int((row <= row[g]).sum()) for row, g in zip(scores, gt, strict=True)]


def _summary(ranks: list[int]) -> dict[str, float]:
    r = sorted(ranks)
    return {
        "r1": 100 * sum(x <= 1 for x in r) / len(r),
        "r5": 100 * sum(x <= 5 for x in r) / len(r),
        "r10": 100 * sum(x <= 10 for x in r) / len(r),
        "medr": float(r[(len(r) - 1) // 2]),  # the lower median, as torch.median
        "meanr": sum(r) / len(r),
        "count": float(len(r)),
    }


def test_metrics_match_a_naive_recomputation(checkpoints, eval_shards, local_result):
    """Embeddings clip by clip, every volume as sqrt(det G) of an explicit Gram matrix, ranks by
    counting: the same numbers as the chunked, masked, batched evaluation."""
    model, _, _ = load_checkpoint(checkpoints.good / "model.safetensors")
    model.eval()
    clips = SyntheticClips(EVAL_CLIPS, seed=2)
    cfg = DecodeConfig.from_model(model.cfg)
    order = sorted(range(EVAL_CLIPS), key=lambda i: clips.clip(i).key)  # the report's key order
    video, audio, has_audio, text, owner, labels = [], [], [], [], [], []
    with torch.no_grad():
        for j, i in enumerate(order):
            item = decode_sample(clips[i], cfg, train=False)
            batch = collate([item])
            video.append(model.encode("video", batch)[0])
            audio.append(model.encode("audio", batch)[0])
            has_audio.append(item["audio_present"])
            for caption in item["captions"]:
                text.append(model.encode("text", {"text": [caption]})[0])
                owner.append(j)
            labels.append((clips.clip(i).color, clips.clip(i).sound))
    n, nt = len(order), len(text)

    # Every clip is counted, none dropped; the ones without audio are scored on (text, video).
    assert local_result.report["counts"] == {
        "clips": 36,
        "captions": 72,
        "missing": {"video": 0, "audio": 3},
        "skipped_samples": 0,
    }
    assert sum(not h for h in has_audio) == 3

    def volumes(items) -> torch.Tensor:
        return torch.tensor(
            [
                [
                    _naive_volume(
                        [text[c], *[m[j] for m in items if m is not audio or has_audio[j]]]
                    )
                    for j in range(n)
                ]
                for c in range(nt)
            ]
        )

    v = volumes([video, audio])  # [Nt, Ni]; clips without audio: (text, video) only
    t2i = _ranks(v, owner)
    i2t = []
    for j in range(n):
        own = [c for c in range(nt) if owner[c] == j]
        best = min(float(v[c, j]) for c in own)
        i2t.append(1 + sum(float(v[c, j]) <= best for c in range(nt) if owner[c] != j))
    expected = {f"volume_t2i_{k}": x for k, x in _summary(t2i).items()}
    expected.update({f"volume_i2t_{k}": x for k, x in _summary(i2t).items()})

    with_audio = [j for j in range(n) if has_audio[j]]
    rows = [c for c in range(nt) if has_audio[owner[c]]]
    cos = torch.tensor([[-float(text[c] @ audio[j]) for j in with_audio] for c in rows])
    expected.update(
        {
            f"cosine_audio_t2i_{k}": x
            for k, x in _summary(_ranks(cos, [with_audio.index(owner[c]) for c in rows])).items()
        }
    )
    cos_v = torch.tensor([[-float(text[c] @ video[j]) for j in range(n)] for c in range(nt)])
    expected.update({f"cosine_video_t2i_{k}": x for k, x in _summary(_ranks(cos_v, owner)).items()})

    classes = sorted(set(labels))
    prompts = CLASSIFY.prompts
    with torch.no_grad():
        class_vecs = []
        for color, sound in classes:
            p = [
                model.encode("text", {"text": [t.format(color=color, sound=sound)]})[0]
                for t in prompts
            ]
            mean = torch.stack([x / x.norm() for x in p]).mean(0)
            class_vecs.append(mean / mean.norm())
    scores = torch.tensor(
        [
            [
                _naive_volume([cv, video[j], *([audio[j]] if has_audio[j] else [])])
                for cv in class_vecs
            ]
            for j in range(n)
        ]
    )  # [Ni, C]
    truth = [classes.index(lab) for lab in labels]
    cls_ranks = _ranks(scores, truth)
    expected["zeroshot_top1"] = 100 * sum(r <= 1 for r in cls_ranks) / n
    expected["zeroshot_top5"] = 100 * sum(r <= 5 for r in cls_ranks) / n
    confusion = [[0] * len(classes) for _ in classes]
    for j in range(n):
        confusion[truth[j]][int(scores[j].argmin())] += 1

    got = local_result.metrics
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert local_result.report["classification"]["confusion"] == confusion
    assert local_result.report["classification"]["classes"] == [" ".join(c) for c in classes]
    print(
        "metric test:",
        {
            k: round(got[k], 2)
            for k in (
                "volume_t2i_r1",
                "volume_i2t_r1",
                "cosine_video_t2i_r1",
                "cosine_audio_t2i_r1",
                "zeroshot_top1",
                "zeroshot_top5",
            )
        },
    )
    # What GRAM claims, on this tiny model: the volume beats either cosine baseline.
    assert got["volume_t2i_r1"] >= 60
    assert got["volume_t2i_r1"] > got["cosine_video_t2i_r1"] + 20
    assert got["volume_t2i_r1"] > got["cosine_audio_t2i_r1"] + 20
    # Subsets: (text, video) volume ranks clips by |cos|, over the same clips as cosine video.
    assert got["volume_video_t2i_count"] == nt
    assert got["volume_audio_t2i_count"] == len(rows)


def test_report_and_pictures_are_written(local_result):
    report = json.loads(local_result.report_path.read_text())
    assert report["format"] == "gram-eval-1"
    assert report["eval_set"]["eval_id"] == local_result.eval_id
    assert set(report["pictures"]) == {
        "recall_at_k.png",
        "volume_hist.png",
        "confusion.png",
        "top5_retrievals.png",
    }
    for picture in local_result.pictures:
        assert picture.read_bytes().startswith(PNG)
        assert picture.stat().st_size > 5000
    dist = report["volume_distribution"]
    assert sum(dist["positive"]) == 72
    assert sum(dist["negative"]) == 72 * 35
    assert dist["positive_mean"] < dist["negative_mean"]
    assert len(report["recall_curves"]["volume_t2i"]) == 50
    assert report["recall_curves"]["volume_t2i"][-1] == 100.0


@pytest.mark.slow
def test_evaluate_job_on_ray_with_s3_logs_report_pictures_and_metrics(
    tmp_path, ray_cluster, s3_server, mlflow_server, checkpoints, local_result
):
    """The real job: two Ray tasks on the two nodes, shards and checkpoint on S3, a run in
    MLflow that is a child of the training run, holding the metrics, report and pictures."""
    bucket = s3_server.make_bucket("evaluate")
    write_sample_shards(
        SyntheticClips(EVAL_CLIPS, seed=2), f"s3://{bucket}/shards/eval", samples_per_shard=12
    )
    client = MlflowClient(mlflow_server.url)
    train_run = training_run(client, "evaluate-test", "s3://...")
    ckpt = checkpoint_of_run(checkpoints.good, tmp_path / "ckpt", train_run)
    s3 = s3_server.client()
    for f in ckpt.iterdir():
        s3.upload_file(str(f), bucket, f"runs/good/{f.name}")
    out = tmp_path / "report"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.evaluate",
            "--config",
            str(REPO / "jobs" / "configs" / "evaluate.yaml"),
            f"model=s3://{bucket}/runs/good",
            f"eval.shards=s3://{bucket}/shards/eval",
            "eval.parallel.tasks=2",
            "eval.parallel.cpus_per_task=0.5",
            f"output={out}",
            "run_name=eval-on-ray",
            f"tracking.tracking_uri={mlflow_server.url}",
            *SYNTHETIC_CLASSES,
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "text -> (video+audio) R@1, volume" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["embedding"] == {"mode": "ray", "tasks": 2, "nodes": 2}
    assert report["model"]["training_run_id"] == train_run
    # The eval set is the same bytes in another place: same fingerprint, same numbers.
    assert report["eval_set"]["eval_id"] == local_result.eval_id
    for key, value in local_result.metrics.items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in (out / "report.json").read_text()

    run_id = res.stdout.split("MLflow run: ")[1].split()[0]
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == train_run
    assert run.data.tags["gram.evaluated_run_id"] == train_run
    assert run.data.tags["gram.eval_id"] == local_result.eval_id
    assert run.data.metrics["volume_t2i_r1"] == pytest.approx(local_result.metrics["volume_t2i_r1"])
    assert run.data.metrics["zeroshot_top1"] == pytest.approx(local_result.metrics["zeroshot_top1"])
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert logged == {
        "evaluation/report.json",
        "evaluation/recall_at_k.png",
        "evaluation/volume_hist.png",
        "evaluation/confusion.png",
        "evaluation/top5_retrievals.png",
    }
    picture = client.download_artifacts(run_id, "evaluation/recall_at_k.png", str(tmp_path))
    assert Path(picture).read_bytes().startswith(PNG)


def _help(job) -> str:
    """What `python -m jobs.<job> --help` prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        job.main(["--help"])
    return out.getvalue()


def test_every_job_lists_its_config_keys_with_defaults_and_loads_its_example_config():
    from jobs import evaluate, promote, register

    for job, cls, name in (
        (evaluate, evaluate.EvaluateConfig, "evaluate"),
        (register, register.RegisterConfig, "register"),
        (promote, promote.PromoteConfig, "promote"),
    ):
        text = _help(job)
        assert "config keys (default):" in text
        assert "eval.parallel.tasks" in text
        assert "tracking.tracking_uri" in text
        load_config(cls, REPO / "jobs" / "configs" / f"{name}.yaml")
    assert "--rollback" in _help(promote)


def test_configuration_errors_exit_2_and_say_how_to_fix(tmp_path, capsys, checkpoints):
    from jobs import evaluate

    code = evaluate.main(
        [f"model={checkpoints.good}", f"eval.shards={tmp_path}", "tracking.enabled=false"]
    )
    assert code == 2
    assert "has no index.json" in capsys.readouterr().err
    assert evaluate.main(["model=/nowhere", "eval.shards=x"]) == 2
    assert "give a training checkpoint folder" in capsys.readouterr().err
    assert evaluate.main(["eval.parallel.cpus_per_task=0"]) == 2
    assert "cpus_per_task must be > 0" in capsys.readouterr().err


def test_a_tower_pointing_away_from_its_text_is_reported_and_sign_aligned(
    tmp_path, capsys, checkpoints, eval_shards, local_result
):
    """The trained model with its video projection negated: every video embedding flips
    sign. The volume does not change; signed cosine collapses; the sign-aligned metrics
    equal the original model's; `gram evaluate` warns. (The GRAM-trained model itself
    may already point a tower away from its text: the volume leaves the sign free.)"""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from jobs import evaluate

    flipped = tmp_path / "flipped"
    shutil.copytree(checkpoints.good, flipped)
    weights = flipped / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        header = dict(f.metadata())
    state = load_file(str(weights))
    state["projections.video.weight"] = -state["projections.video.weight"]
    save_file(state, str(weights), metadata=header)

    code = evaluate.main(
        [
            f"model={flipped}",
            f"eval.shards={eval_shards}",
            "eval.parallel.local=true",
            "tracking.enabled=false",
            f"output={tmp_path / 'out'}",
            *SYNTHETIC_CLASSES,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "warning: the mean cosine of true (caption, video) pairs is -" in out
    assert "loss.cosine_weight > 0" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    metrics, good = report["metrics"], local_result.metrics
    before = set(local_result.report["signs"]["flipped"])
    assert set(report["signs"]["flipped"]) == before ^ {"video"}
    assert metrics["sign_flipped_video"] == 1.0 - good["sign_flipped_video"]
    assert metrics["sign_positive_cosine_video"] == pytest.approx(
        -good["sign_positive_cosine_video"], abs=1e-5
    )
    assert metrics["volume_t2i_r1"] == pytest.approx(good["volume_t2i_r1"])
    assert metrics["cosine_video_t2i_r1"] != pytest.approx(good["cosine_video_t2i_r1"])
    for key in ("t2i_r1", "t2i_r5", "i2t_r1", "t2i_medr"):
        for tower in ("video", "audio"):
            name = f"cosine_aligned_{tower}_{key}"
            assert metrics[name] == pytest.approx(good[name]), name
    assert metrics["zeroshot_cosine_aligned_video_top1"] == pytest.approx(
        good["zeroshot_cosine_aligned_video_top1"]
    )


def test_a_model_is_compared_with_the_model_it_started_from(
    tmp_path, capsys, checkpoints, eval_shards, local_result
):
    """`baseline=source` on weights that record `checkpoints.good` as their source (the
    untrained model stands in for a fine-tune gone wrong): the source is evaluated on the
    same set, every compared metric is printed and stored before and after, and exactly
    the metrics that fell by more than `drift_points` are warned about."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from jobs import evaluate
    from jobs.evaluation.baseline import metric_label
    from jobs.training.checkpoints import INIT_FROM_KEY

    tuned = tmp_path / "tuned"
    shutil.copytree(checkpoints.untrained, tuned)
    weights = tuned / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        header = dict(f.metadata())
    save_file(
        load_file(str(weights)),
        str(weights),
        metadata={**header, INIT_FROM_KEY: str(checkpoints.good)},
    )

    def args(model: Path, out: str, *extra: str) -> list[str]:
        return [
            f"model={model}",
            f"eval.shards={eval_shards}",
            "eval.parallel.local=true",
            "tracking.enabled=false",
            f"output={tmp_path / out}",
            *SYNTHETIC_CLASSES,
            *extra,
        ]

    assert evaluate.main(args(tuned, "out", "baseline=source")) == 0
    out = capsys.readouterr().out
    assert f"against the baseline {checkpoints.good} (metrics evaluated now):" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    section = report["baseline"]
    assert section["uri"] == str(checkpoints.good)
    assert section["drift_points"] == 5.0
    deltas = {d["metric"]: d for d in section["deltas"]}
    assert {"volume_t2i_r1", "volume_i2t_r1", "cosine_audio_t2i_r1"} <= set(deltas)
    assert not [k for k in deltas if "aligned" in k or k.endswith(("_r5", "_medr"))]
    for key, d in deltas.items():
        assert d["before"] == pytest.approx(local_result.metrics[key]), key
        assert d["after"] == pytest.approx(report["metrics"][key]), key
    fell = {k for k, d in deltas.items() if d["after"] - d["before"] < -5.0}
    assert "volume_t2i_r1" in fell, "the untrained model is far below the trained one"
    warned = {k for k in deltas if f"warning: {metric_label(k)} fell" in out}
    assert warned == fell

    assert (
        evaluate.main(args(tuned, "out2", f"baseline={checkpoints.good}", "drift_points=100")) == 0
    )
    out = capsys.readouterr().out
    assert "against the baseline" in out
    assert " fell " not in out

    assert evaluate.main(args(checkpoints.good, "out3", "baseline=source")) == 2
    assert "records no source model" in capsys.readouterr().err
    assert evaluate.main(args(tuned, "out4", "drift_points=-1")) == 2
    assert "drift_points must be >= 0" in capsys.readouterr().err
