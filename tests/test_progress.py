"""Progress lines in logs: every quarter and at least every 30 s, with images/s and time left."""

import io

import torch
from rich.console import Console
from rich.progress import Progress

from ensemble_kd.progress import ImagesPerSecond, LineProgress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _lines(steps=4, every_s=30.0):
    buffer, clock = io.StringIO(), FakeClock()
    return LineProgress(Console(file=buffer, width=300), steps=steps, every_s=every_s, clock=clock), buffer, clock


def test_a_slow_task_prints_every_30_s_between_quarters_with_rate_and_time_left():
    progress, buffer, clock = _lines()
    task = progress.add_task("cache teachers", total=400, status="", images_per_step=128)
    for _ in range(40):  # 10 s a step: a quarter (100 steps) takes 1000 s
        clock.now += 10.0
        progress.update(task, advance=1)
    lines = buffer.getvalue().splitlines()
    # steps 3, 6, 9, ...: one line each time 30 s have passed since the last
    assert len(lines) == 13
    assert lines[0] == "cache teachers: 1% (3/400 steps, 30 s, 13 images/s, 66 min left)"  # 128/10 img/s; 397·10 s
    assert lines[-1].startswith("cache teachers: 10% (39/400 steps, 390 s, 13 images/s, 60 min left")


def test_a_fast_task_prints_quarters_only_and_steps_per_s_without_a_batch_size():
    progress, buffer, clock = _lines()
    task = progress.add_task("teacher 00", total=8, status="")
    for _ in range(8):
        clock.now += 0.5
        progress.update(task, advance=1)
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "teacher 00: 25% (2/8 steps, 1 s, 2.00 steps/s, 3 s left)"
    assert lines[-1] == "teacher 00: 100% (8/8 steps, 4 s, 2.00 steps/s)"
    assert len(lines) == 4


def test_a_resumed_task_rates_only_the_steps_run_here():
    progress, buffer, clock = _lines()
    task = progress.add_task("student", total=100, completed=50, status="", images_per_step=10)
    clock.now += 40.0
    progress.update(task, advance=20)  # 20 steps in 40 s: 5 images/s, 30 steps left = 60 s
    assert buffer.getvalue().splitlines() == ["student: 70% (70/100 steps, 40 s, 5.0 images/s, 60 s left)"]


def test_work_found_done_is_not_counted_in_the_rate():
    progress, buffer, clock = _lines()
    task = progress.add_task("cache teachers", total=100, status="", images_per_step=10)
    progress.update(task, completed=40)  # a resumed build's committed epoch: no time spent on it here
    clock.now += 20.0
    progress.update(task, advance=10)  # 10 steps in 20 s: 5 images/s, 50 steps left = 100 s, shown as 2 min
    assert buffer.getvalue().splitlines()[-1] == "cache teachers: 50% (50/100 steps, 20 s, 5.0 images/s, 2 min left)"


def test_time_lines_only_print_nothing_for_a_short_loop():
    progress, buffer, clock = _lines(steps=0)
    task = progress.add_task("evaluate on test", total=10, status="", images_per_step=1)
    for _ in range(10):
        clock.now += 2.0
        progress.update(task, advance=1)
    assert buffer.getvalue() == ""
    clock.now += 40.0
    task = progress.add_task("evaluate on val", total=10, status="", images_per_step=31)
    clock.now += 31.0
    progress.update(task, advance=1)  # 1 image/s; 9 steps of 31 s left = 4.65 min
    assert buffer.getvalue().splitlines() == ["evaluate on val: 10% (1/10 steps, 31 s, 1.0 images/s, 5 min left)"]


def test_the_bar_shows_images_per_second():
    clock = FakeClock()
    progress = Progress(ImagesPerSecond(), console=Console(file=io.StringIO()), get_time=clock)
    task = progress.add_task("train", total=10, images_per_step=64)
    column = ImagesPerSecond()
    assert str(column.render(progress.tasks[task])) == ""  # no rate before a step
    for _ in range(2):
        clock.now += 1.0
        progress.update(task, advance=2)  # 2 steps a second of 64 images
    assert str(column.render(progress.tasks[task])) == "128 img/s"
    plain = progress.add_task("other", total=10)
    clock.now += 1.0
    progress.update(plain, advance=1)
    clock.now += 1.0
    progress.update(plain, advance=1)
    assert str(column.render(progress.tasks[plain])) == "1.00 steps/s"


def test_predict_reports_to_the_progress_given():
    from ensemble_kd.evaluation import predict

    class Steps:
        def __init__(self):
            self.updates = []

        def add_task(self, description, total, **fields):
            self.task = (description, total, fields.get("images_per_step"))
            return 0

        def update(self, task, advance=0, **fields):
            self.updates.append(advance)

    class Loader:
        batch_size = 4

        def __len__(self):
            return 3

        def batches(self, epoch):
            for n in (4, 4, 2):
                yield type("B", (), {"x": torch.zeros(n, 3), "y": torch.zeros(n, dtype=torch.long)})

    steps = Steps()
    logits, labels = predict(torch.nn.Linear(3, 2), Loader(), "evaluate x on test", progress=steps)
    assert logits.shape == (10, 2) and steps.task == ("evaluate x on test", 3, 4) and steps.updates == [1, 1, 1]


class Recorder:
    """A progress that keeps each task's fields and steps."""

    def __init__(self):
        self.tasks = []

    def add_task(self, description, total, completed=0, **fields):
        self.tasks.append({"description": description, "total": total, "done": completed, **fields})
        return len(self.tasks) - 1

    def update(self, task, advance=0, completed=None, **fields):
        t = self.tasks[task]
        t["done"] = completed if completed is not None else t["done"] + advance


def test_training_and_caching_rate_every_ranks_images(tmp_path):
    from ensemble_kd import pipeline
    from ensemble_kd.config import load_config
    from ensemble_kd.engine import Trainer
    from ensemble_kd.ensemble import TeacherSet
    from ensemble_kd.ensemble.cache import build_cache
    from ensemble_kd.methods import create_method
    from ensemble_kd.models import create

    config = load_config(None, ["device=cpu", "data.batch_size=100", "teachers.train.epochs=1",
                                "teachers.kwargs={width: 0.25}"])
    data = pipeline.prepare_data(config)
    n = len(data.splits.train)
    model = pipeline.build_model(config.teachers.resolved_members()[0], data)
    progress = Recorder()
    Trainer(model, create_method("ce"), data.train_loader(config.data, seed=0), config.teachers.train, tmp_path,
            device=data.device, seed=0, progress=progress).fit()
    (train,) = progress.tasks
    assert train["images_per_step"] == 100 and train["done"] == train["total"] == n // 100  # drop_last

    progress = Recorder()
    build_cache(TeacherSet([model]), data.train_loader(config.data, seed=0), tmp_path / "cache", epochs=1, rank=1,
                world_size=2, batch_size=64, progress=progress)
    (cache,) = progress.tasks
    assert cache["images_per_step"] == 128  # both ranks' batches of 64
    assert 128 * (cache["total"] - 1) < n <= 128 * cache["total"]


def test_the_corruption_suite_reports_each_pass(monkeypatch):
    from ensemble_kd.metrics import corruptions

    progress = Recorder()
    monkeypatch.setattr(corruptions, "quiet_progress", lambda: progress)
    images = torch.rand(6, 3, 8, 8)
    corruptions.corruption_suite(lambda x: x.flatten(1)[:, :2], images, torch.zeros(6, dtype=torch.long),
                                 names=["gaussian_noise", "contrast"], severities=(1, 3))
    assert progress.tasks == [{"description": "corruptions", "total": 4, "done": 4, "images_per_step": 6}]
