"""Training: the step as the reference trains, and real Ray Train runs (2 CPU workers) on tiny real images.

The Ray runs share one config: 8 steps of 4 images at 64 px, training the local head (attention,
autoencoder, attention classifier) of a calibrated random model, with frozen BatchNorm so one worker and two
compute the same update (per-worker batch statistics would differ). Full-model training on a random
backbone does not settle in 8 steps (the reconstruction target moves with the backbone), so the full step
is checked in-process. Runs: the CLI with two workers, the library with one, a crashed + resumed one.
"""

from __future__ import annotations

import functools
import io
import json
import queue
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import train as train_job
from pipeline.config import get_preset, trained_preset
from pipeline.features import build_extractor
from pipeline.manifest import ManifestError, manifest_fingerprint, read_manifest
from pipeline.train import (
    TrainCluster,
    TrainConfig,
    TrainJob,
    TrainLoop,
    WorkerPlace,
    build_trainee,
    run_identity,
    run_training,
    set_train_mode,
    train_step,
)
from pipeline.train_data import (
    BatchStream,
    ImageSource,
    ImageTransform,
    SampleSequence,
    TaskDecoder,
    ThreadDecoder,
    TrainingRows,
    random_crop_box,
    training_rows,
)
from tests.inprocess import run_cli
from tests.models import calibrated_weights

PRESET = "cpu-small"  # MobileNetV2 with a learned local head: small enough for CPU tests
SIZE = 64
COLOURS = [(200, 40, 40), (40, 170, 40), (40, 40, 200)]
STEPS, BATCH = 8, 4
RAY_RUN = dict(
    steps=STEPS,
    batch_size=BATCH,
    image_size=SIZE,
    lr=0.05,
    trainable="local-head",
    batchnorm="frozen",
    log_every=1,
)


def write_images(folder: Path, per_class: int = 4) -> list[dict]:
    """Colour-coded classes with noise and a bright square at a random place; one row points at nothing."""
    rng = np.random.default_rng(0)
    rows = []
    for label, colour in enumerate(COLOURS):
        for i in range(per_class):
            pixels = np.array(colour)[None, None] + rng.normal(0, 25, (SIZE, SIZE, 3))
            y, x = rng.integers(0, SIZE - 16, size=2)
            pixels[y : y + 16, x : x + 16] = 255
            path = folder / f"{label}-{i}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
            rows.append({"id": path.stem, "url": str(path), "landmark_id": f"L{label}"})
    rows.append({"id": "gone", "url": str(folder / "gone.png"), "landmark_id": "L0"})
    return rows


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("train-images")
    path = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(write_images(folder)), path)
    return str(path)


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory) -> str:
    return calibrated_weights(get_preset(PRESET), tmp_path_factory.mktemp("init") / "init.pt")


def job(manifest: str, out: Path, weights: str | None = None, **overrides) -> TrainJob:
    return TrainJob(manifest, str(out), PRESET, TrainConfig(**(RAY_RUN | overrides)), weights_url=weights)


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ the step, without Ray


def tiny_batch(manifest: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    rows = training_rows(read_manifest(manifest))
    images = torch.randn(4, 3, SIZE, SIZE)
    return images, torch.tensor([0, 1, 2, 0]), len(rows.classes)


def test_local_losses_leave_the_backbone_unchanged(manifest):
    images, labels, classes = tiny_batch(manifest)
    trainee = build_trainee(job(manifest, Path("unused"), trainable="all"), classes)
    set_train_mode(trainee)
    terms = trainee(images, labels, torch.Generator())
    (terms["attention"].mean() + terms["reconstruction"].mean()).backward()
    backbone = dict(trainee.model.backbone.named_parameters())
    assert all(p.grad is None for p in backbone.values())  # stop-gradient: not even zeros
    assert trainee.model.autoencoder.encoder.weight.grad.abs().sum() > 0
    assert trainee.model.attention.conv1.weight.grad.abs().sum() > 0
    assert terms["global"].grad_fn is not None  # the global loss alone trains the backbone


def test_local_head_training_keeps_backbone_weights_and_statistics(manifest):
    images, labels, classes = tiny_batch(manifest)
    trainee = build_trainee(job(manifest, Path("unused"), trainable="local-head", batchnorm="batch"), classes)
    before = {k: v.clone() for k, v in trainee.model.state_dict().items()}
    set_train_mode(trainee)
    optimizer = torch.optim.SGD([p for p in trainee.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    sums = train_step(trainee, optimizer, images, labels, 0.1, 1 / 4, torch.Generator())
    assert set(sums) == {"attention", "reconstruction", "loss"}
    after = trainee.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("attention.", "autoencoder.")) for k in changed)


def test_global_head_fine_tuning_needs_a_whitening_layer(manifest):
    with pytest.raises(ValueError, match="whitening"):
        build_trainee(job(manifest, Path("unused"), trainable="global-head"), 3)


def test_metric_objective_replaces_arcface(manifest):
    images, labels, classes = tiny_batch(manifest)
    trainee = build_trainee(
        job(manifest, Path("unused"), trainable="all", objective="triplet", margin=0.5), classes
    )
    assert trainee.arcface is None
    terms = trainee(images, labels, torch.Generator().manual_seed(0))
    assert terms["global"].shape == (4,)
    assert terms["global"][1] == 0  # label 1 has no positive in the batch


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        TrainConfig()
    with pytest.raises(ValueError, match="objective 'arcfase'"):
        TrainConfig(steps=1, objective="arcfase")
    assert TrainConfig(epochs=2.5, batch_size=4).total_steps(13) == 9


def test_train_job_rejects_unknown_settings(manifest, tmp_path):
    command = [
        sys.executable,
        "jobs/train.py",
        "--manifest",
        manifest,
        "--out",
        str(tmp_path),
        "--preset",
        PRESET,
    ]
    command += ["--steps", "1", "--bogus", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 2
    assert "unrecognized arguments: --bogus 1" in done.stderr


def test_train_job_progress_line():
    line = {"step": 3, "total_steps": 10, "loss": 1.23456, "images_per_s": 12.34, "lr": 0.01}
    assert train_job.progress_line(line) == "train: step 3/10, loss 1.2346, 12.3 images/s"


def test_training_rows_read_local_files_under_the_manifest_only(tmp_path):
    """The extraction's local-file policy holds for training: a row outside the manifest's folder is a failed
    row (local_file_refused), unless the job opts in."""
    inside, outside = tmp_path / "data" / "in.png", tmp_path / "out.png"
    inside.parent.mkdir()
    for path in (inside, outside):
        Image.new("RGB", (40, 30), (90, 120, 150)).save(path)
    manifest = str(tmp_path / "data" / "m.parquet")
    rows = TrainingRows([str(inside), str(outside)], [None, None], np.array([0, 0]), ("a",))
    transform = ImageTransform(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), augment=False)
    for allow, refused in ((False, True), (True, False)):
        job = TrainJob(manifest, "o", "cpu-small", TrainConfig(steps=1), allow_local_outside_root=allow)
        source = ImageSource(rows, transform, 0, local_files=job.local_files())
        assert isinstance(source.load(0, 0), torch.Tensor)
        loaded = source.load(1, 1)
        assert (getattr(loaded, "reason", None) == "local_file_refused") == refused


def test_unlabelled_rows_are_a_manifest_error(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "url": [str(tmp_path / "a.png")]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="landmark_id"):
        training_rows(read_manifest(str(tmp_path / "m.parquet")))


def test_balanced_sampling_draws_adjacent_images_of_one_class():
    labels = np.array([0] * 10 + [1] + [2, 2])
    sequence = SampleSequence(labels, "balanced", images_per_class=2, seed=3)
    rows = sequence.rows(0, 40)
    assert (labels[rows[0::2]] == labels[rows[1::2]]).all()
    assert set(labels[rows]) == {0, 1, 2}  # the one-image class is drawn too (twice, with replacement)
    assert np.array_equal(SampleSequence(labels, "balanced", 2, 3).rows(22, 30), rows[22:30])


def test_uniform_sampling_visits_every_row_once_per_epoch():
    sequence = SampleSequence(np.arange(7) % 2, "uniform", 1, seed=0)
    assert sorted(sequence.rows(7, 14)) == list(range(7))


def test_random_crop_stays_inside_and_covers_a_tenth():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_crop_box(50, 80, rng)
        assert top >= 0 and top + h <= 50 and left >= 0 and left + w <= 80
        assert h * w >= 0.1 * 50 * 80 * 0.9  # rounding


def test_decode_setting_resolves_and_rejects_unknown_values():
    assert TrainCluster().decode_where(gpus_per_worker=1.0) == "tasks"
    assert TrainCluster().decode_where(gpus_per_worker=0.0) == "threads"
    assert TrainCluster(decode="tasks").decode_where(0.0) == "tasks"
    assert TrainCluster(decode="threads").decode_where(1.0) == "threads"
    with pytest.raises(ValueError, match=r"decode 'gpu'; allowed: \['auto', 'threads', 'tasks'\]"):
        TrainCluster(decode="gpu")
    with pytest.raises(ValueError, match="decode_chunk must be ≥ 1"):
        TrainCluster(decode_chunk=0)


def test_task_decoding_gives_the_thread_decoded_batches(tmp_path, ray_cluster):
    """Ray tasks (chunks of 3 positions, the last one short) and this process's threads give the same
    batches bit for bit, and count and skip the same bad rows: a missing file and a corrupt one."""
    rows = write_images(tmp_path, per_class=2)  # 6 images and a missing file
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    rows.append({"id": "corrupt", "url": str(tmp_path / "corrupt.png"), "landmark_id": "L1"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    training = training_rows(read_manifest(str(tmp_path / "m.parquet")))
    transform = ImageTransform(32, (120.0, 110.0, 100.0), (60.0, 60.0, 60.0), augment=True)
    source = ImageSource(training, transform, seed=5)
    sequence = SampleSequence(training.labels, "uniform", 1, seed=1)
    streams = {
        "threads": BatchStream(ThreadDecoder(source, threads=3), sequence, 10, (2, 10), prefetch=1),
        "tasks": BatchStream(TaskDecoder(source, cpus=0.5, chunk=3), sequence, 10, (2, 10), prefetch=1),
    }
    made = {}
    for name, stream in streams.items():
        made[name] = list(stream.batches(1, 5))
        stream.close()
    drawn = np.concatenate([sequence.rows(step * 10 + 2, step * 10 + 10) for step in range(1, 5)])
    bad = {"missing": int((drawn == 6).sum()), "not_an_image": int((drawn == 7).sum())}
    assert bad["missing"] > 0 and bad["not_an_image"] > 0
    for threads, tasks in zip(made["threads"], made["tasks"], strict=True):
        assert torch.equal(tasks.images, threads.images) and torch.equal(tasks.labels, threads.labels)
        assert tasks.failures == threads.failures
    assert sum((batch.failures for batch in made["tasks"]), Counter()) == bad
    assert sum(len(batch.labels) for batch in made["tasks"]) == 4 * 8 - sum(bad.values())


# ------------------------------------------------------------------ real Ray Train


@pytest.fixture(scope="module")
def two_workers_cli(manifest, initial_weights, ray_cluster, tmp_path_factory) -> Path:
    """8 steps with 2 CPU workers through the CLI, connected to the test's Ray cluster, decoding in Ray
    tasks (the library's runs decode in threads, the CPU default). The CLI runs in this process: its Ray
    Train run is the same, and the decode tasks reuse the session's warm workers."""
    out = tmp_path_factory.mktemp("train-2w") / "out"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in RAY_RUN.items()]
    command = ["train", manifest, str(out), "--preset", PRESET, *args]
    command += ["--weights", initial_weights]
    command += [
        "--workers",
        "2",
        "--cpus-per-worker",
        "0.5",
        "--decode",
        "tasks",
        "--decode-cpus",
        "0.5",
        "--address",
        ray_cluster,
    ]
    done = run_cli(*command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final loss" in done.stdout and f"--preset {PRESET}" in done.stdout  # what to extract with
    return out


@pytest.fixture(scope="module")
def one_worker(manifest, initial_weights, ray_cluster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train-1w") / "out"
    run_training(
        job(manifest, out, initial_weights, checkpoint_every=3), TrainCluster(workers=1, cpus_per_worker=0.5)
    )
    return out


def test_loss_falls_and_bad_rows_are_counted(two_workers_cli, manifest):
    lines = metrics(two_workers_cli)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert {"loss", "attention", "reconstruction", "lr", "images_per_s"} <= set(lines[0])
    first, last = np.mean([m["loss"] for m in lines[:3]]), np.mean([m["loss"] for m in lines[-3:]])
    assert last < 0.9 * first
    labels = training_rows(read_manifest(manifest)).labels
    drawn = SampleSequence(labels, "uniform", 1, seed=0).rows(0, STEPS * BATCH)
    bad = int((drawn == len(labels) - 1).sum())  # the missing image is the manifest's last row
    assert bad > 0
    assert sum(m["failed_rows"] for m in lines) == bad
    assert sum(m["images"] for m in lines) == STEPS * BATCH - bad
    record = json.loads((two_workers_cli / "_run.json").read_text())
    assert (
        record["workers"] == 2 and record["decode"] == "tasks" and record["failed_rows"] == {"missing": bad}
    )


def assert_same_updates(one: dict, two: dict, initial: dict) -> None:
    """Every tensor's update (weights − initial) agrees: ‖Δ₂ − Δ₁‖ ≤ 1% of ‖Δ₁‖ plus a few float32 ulps of the
    weights (steps of BatchNorm scales near 1 are a few ulps). A half batch per worker sums in another float32
    order, and after a step the ReLU6 / GeM-clamp branches of a few activations can flip, so single elements of
    tiny steps differ by more than rounding; a wrong DDP weighting is off by a factor of the whole update."""
    assert two.keys() == one.keys()
    for key in one:
        start = initial.get(key, torch.zeros_like(one[key])).to(one[key].dtype)
        step_one, step_two = (one[key] - start).double(), (two[key] - start).double()
        size, ulps = (
            float(step_one.norm()),
            8 * torch.finfo(torch.float32).eps * float(one[key].double().norm()),
        )
        assert float((step_two - step_one).norm()) <= 1e-2 * size + ulps, (key, size)


def test_two_workers_make_the_same_update_as_one(two_workers_cli, one_worker, initial_weights):
    two, one = load(two_workers_cli / "weights.pt"), load(one_worker / "weights.pt")
    assert two.keys() == one.keys()
    initial = load(Path(initial_weights))
    moved = {k.split(".")[0] for k in one if k not in initial or not torch.equal(one[k], initial[k])}
    assert moved == {"attention", "autoencoder"}  # the local head trained, the frozen backbone did not
    assert_same_updates(one, two, initial)


def test_the_loop_runs_without_ray_to_the_ray_workers_weights(
    manifest, initial_weights, one_worker, tmp_path
):
    """The training loop itself knows no Ray: one in-process worker (threads decode) makes the same update as
    the one-worker Ray Train run."""
    out = tmp_path / "out"
    run = job(manifest, out, initial_weights, checkpoint_every=3)
    table = read_manifest(manifest)
    rows = training_rows(table)
    identity = run_identity(run, manifest_fingerprint(table), rows, run.config.total_steps(len(rows.labels)))
    lines: queue.Queue = queue.Queue()
    summary = TrainLoop(
        run, TrainCluster(), identity, rows, WorkerPlace(), functools.partial(ThreadDecoder, threads=2), lines
    ).run()
    assert summary["steps"] == STEPS and lines.qsize() == STEPS
    here, there = metrics(out), metrics(one_worker)
    assert [m["step"] for m in here] == [m["step"] for m in there] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in here] == pytest.approx([m["loss"] for m in there], rel=1e-4)
    assert_same_updates(
        load(one_worker / "weights.pt"), load(out / "weights.pt"), load(Path(initial_weights))
    )


def test_killed_run_resumes_to_the_same_weights(manifest, initial_weights, one_worker, s3_bucket):
    """Checkpoints, metrics and weights on object storage (the real S3 server): a run killed after step 5
    resumes from its step-3 checkpoint there to exactly the uninterrupted run's weights and losses (the
    killed run decoded in Ray tasks, the others in threads: the same batches either way)."""
    from pipeline import storage

    out, options = f"{s3_bucket.url}/train", s3_bucket.options
    crashing = TrainCluster(
        workers=1, cpus_per_worker=0.5, crash_after_step=5, decode="tasks", decode_cpus=0.5
    )
    with pytest.raises(Exception, match="injected crash after step 5"):
        run_training(job(manifest, out, initial_weights, checkpoint_every=3), crashing, options)
    assert storage.list_files(f"{out}/checkpoints", options) and not storage.exists(
        f"{out}/weights.pt", options
    )
    cluster = TrainCluster(workers=1, cpus_per_worker=0.5)
    summary = run_training(job(manifest, out, initial_weights, checkpoint_every=3), cluster, options)
    assert summary.resumed_from == 3
    resumed = torch.load(io.BytesIO(storage.read_bytes(f"{out}/weights.pt", options)), weights_only=True)
    uninterrupted = load(one_worker / "weights.pt")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    lines = storage.read_text(f"{out}/metrics.jsonl", options).splitlines()
    assert [json.loads(line)["loss"] for line in lines] == [m["loss"] for m in metrics(one_worker)]


def test_two_workers_train_the_whole_model_as_one(manifest, initial_weights, ray_cluster, tmp_path):
    """DDP over every parameter (backbone, whitening, heads; frozen BatchNorm statistics, which are per
    worker otherwise): 2 workers on halves of each global batch = 1 worker on the whole batch."""
    outs = {n: tmp_path / f"w{n}" for n in (1, 2)}
    for n, out in outs.items():
        cluster = TrainCluster(workers=n, cpus_per_worker=0.5, decode_threads=2)
        # a small lr: at the local-head tests' 0.05 the whole model diverges (loss 34 → 208 in 3 steps), and a
        # diverging run turns float rounding (1e-7) into any difference
        run_training(job(manifest, out, initial_weights, steps=3, lr=0.002, trainable="all"), cluster)
    one, two, initial = (
        load(p) for p in (outs[1] / "weights.pt", outs[2] / "weights.pt", Path(initial_weights))
    )
    moved = {k.split(".")[0] for k in one if k in initial and not torch.equal(one[k], initial[k])}
    assert "backbone" in moved and {"attention", "autoencoder"} <= moved
    assert_same_updates(one, two, initial)


def test_resuming_a_different_run_is_refused(manifest, initial_weights, one_worker):
    with pytest.raises(
        ValueError, match=r"different training run \(differs in \['config', 'total_steps'\]\)"
    ):
        run_training(job(manifest, one_worker, initial_weights, steps=STEPS + 1))


def test_trained_weights_extract(two_workers_cli, manifest):
    extractor = build_extractor(PRESET, str(two_workers_cli / "weights.pt"))  # strict load
    image = torch.from_numpy(np.array(Image.open(read_manifest(manifest).column("url")[0].as_py())))
    features = extractor.extract_single(image.permute(2, 0, 1).contiguous())
    assert features.global_descriptor.shape == (1280,)
    assert np.isfinite(features.global_descriptor).all() and len(features.scores) > 0


def test_imagenet_preset_trains_a_local_head_its_learned_variant_extracts(
    manifest, ray_cluster, shared_dir, tmp_path
):
    """`train --preset delg-mobilenetv2-imagenet` on the backbone-only ImageNet weights writes a learned local
    head: that preset refuses the weights, trained_preset's variant loads all of them and extracts the same
    global descriptor (frozen backbone) with the trained attention and autoencoder picking the local features."""
    preset, backbone = (
        "delg-mobilenetv2-imagenet",
        str(shared_dir / "weights" / "mobilenetv2_imagenet_features.pt"),
    )
    out = tmp_path / "out"
    config = TrainConfig(**(RAY_RUN | {"steps": 2}))
    run_training(
        TrainJob(manifest, str(out), preset, config, weights_url=backbone),
        TrainCluster(workers=1, cpus_per_worker=0.5),
    )
    assert json.loads((out / "_run.json").read_text())["extract_preset"] == trained_preset(preset)
    with pytest.raises(ValueError, match="do not fit"):
        build_extractor(preset, str(out / "weights.pt"))
    learned = build_extractor(trained_preset(preset), str(out / "weights.pt"), device="cpu")
    trained = load(out / "weights.pt")
    state = learned.model.state_dict()
    assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in trained)
    untrained = build_extractor(preset, backbone, device="cpu")
    image = torch.from_numpy(np.array(Image.open(read_manifest(manifest).column("url")[0].as_py())))
    image = image.permute(2, 0, 1).contiguous()
    after, before = learned.extract_single(image), untrained.extract_single(image)
    np.testing.assert_allclose(after.global_descriptor, before.global_descriptor, rtol=0, atol=1e-6)
    assert after.descriptors.shape[1] == before.descriptors.shape[1] == 128
    assert len(after.scores) == len(before.scores)  # every location (threshold 0), chosen and described anew
    assert not np.allclose(after.scores, before.scores)  # trained attention, not the feature norm
    assert not np.allclose(after.descriptors, before.descriptors)  # autoencoder, not the fixed projection


def coil_manifest(shared: Path, folder: Path, objects: int = 4, angles=(0, 10, 20)) -> str:
    """COIL turntable views as a labelled manifest whose ``view`` column is the turntable angle."""
    import csv

    with open(shared / "data" / "coil100-subset" / "labels.csv") as f:
        table = list(csv.DictReader(f))
    kept = sorted({r["object"] for r in table})[:objects]
    rows = [
        {
            "id": r["id"],
            "url": str(shared / "data" / "coil100-subset" / r["file"]),
            "landmark_id": r["object"],
            "view": float(r["angle_deg"]),
        }
        for r in table
        if r["object"] in kept and int(r["angle_deg"]) in angles
    ]
    path = folder / "coil.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.shared
@pytest.mark.parametrize("objective", ["margin", "quadruplet"])
def test_metric_objectives_lower_their_loss_on_real_photos(objective, shared_dir, tmp_path):
    """Margin and quadruplet losses train the ImageNet MobileNetV2's global embedding on COIL views (the
    manifest's ``view`` column orders the quadruplet's positives): the loss on the batch falls."""
    manifest = coil_manifest(shared_dir, tmp_path)
    weights = str(shared_dir / "weights" / "mobilenetv2_imagenet_features.pt")
    train = TrainJob(
        manifest,
        str(tmp_path / "out"),
        "delg-mobilenetv2-imagenet",
        TrainConfig(steps=1, objective=objective, image_size=64, augment=False, batchnorm="frozen"),
        weights_url=weights,
    )
    rows = training_rows(read_manifest(manifest))
    model = train.model_config()
    source = ImageSource(rows, ImageTransform(64, model.pixel_mean, model.pixel_std, False), seed=0)
    batch = source.batch(range(len(rows.labels)), range(len(rows.labels)))
    assert sorted(batch.views.tolist()) == sorted([0.0, 10.0, 20.0] * 4)  # the views reached the batch
    trainee = build_trainee(train, len(rows.classes))
    optimizer = torch.optim.SGD([p for p in trainee.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    set_train_mode(trainee)
    losses = [
        train_step(
            trainee, optimizer, batch.images, batch.labels, 0.01, 1 / 12, torch.Generator(), batch.views
        )["global"]
        for _ in range(6)
    ]
    assert losses[0] > 0 and losses[-1] < 0.8 * losses[0], losses
