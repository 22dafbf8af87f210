"""model.pt and `hsic_ray.load_model`: after real runs of each kind, the loaded module reproduces the run's
reported test accuracy from raw images; a missing or corrupt file is one clear line."""

import pytest
import ray
import torch

import hsic_ray
from hsic_ray.config import build_config
from hsic_ray.data import to_tensor
from hsic_ray.distributed.shutdown import shutdown
from hsic_ray.errors import USER_ERRORS, ConfigError, ModelInputError
from hsic_ray.evaluation import accuracy
from hsic_ray.experiment import run_backprop, run_hsic
from hsic_ray.models import build_head, build_network
from hsic_ray.run.model_io import ModelFileError, model_bytes


def tiny(out, preset="paper_mlp", **extra):
    overrides = {
        "output": str(out),
        "model.depth": 1,
        "model.width": 32,
        "train.batch_size": 128,
        "train.epochs": 1,
        "train.max_steps": 6,
        "head.epochs": 2,
        "train.eval_samples": 128,
        "train.log_every": 3,
        **extra,
    }
    return build_config(preset, overrides=overrides)


def loaded_accuracy(out, data) -> float:
    model = hsic_ray.load_model(out)
    assert not model.training
    with torch.no_grad():
        logits = model(to_tensor(data.x_test))  # raw [0, 1] images: the module does the rest
        # uint8 pixels are scaled as the data pipeline scales them
        assert torch.equal(model(torch.from_numpy(data.x_test[:64])), logits[:64])
    return accuracy(logits, data.y_test)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=3, num_gpus=0, include_dashboard=False)
    yield
    shutdown()


def test_hsic_run_on_the_ray_pipeline_loads_and_reproduces_its_accuracy(tmp_path, digits, local_ray):
    out = tmp_path / "run"
    metrics = run_hsic(tiny(out, trainer="ray", **{"ray.stages": 2}), digits)
    assert metrics["stages"] == 2
    # The layers come from two stage actors' checkpoint files; float rounding may move at most one sample.
    assert loaded_accuracy(out, digits) == pytest.approx(
        metrics["test_accuracy_formatted"], abs=100 / len(digits.y_test)
    )
    assert hsic_ray.load_model(out).method == "hsic"


def test_hsic_resconv_in_process_loads_and_reproduces_its_accuracy(tmp_path, digits):
    out = tmp_path / "run"
    metrics = run_hsic(
        tiny(out, "paper_resconv", trainer="local", **{"model.width": 4, "model.last_width": 16}), digits
    )
    assert loaded_accuracy(out, digits) == metrics["test_accuracy_formatted"]


def test_backprop_run_loads_and_reproduces_its_accuracy(tmp_path, digits):
    out = tmp_path / "run"
    metrics = run_backprop(tiny(out), digits)
    assert loaded_accuracy(out, digits) == metrics["test_accuracy_formatted"]
    assert hsic_ray.load_model(str(out / "model.pt")).method == "backprop"  # the file itself works too


def test_missing_or_corrupt_model_file_is_one_clear_line(tmp_path):
    with pytest.raises(ModelFileError) as missing:
        hsic_ray.load_model(tmp_path)
    message = str(missing.value)
    assert str(tmp_path / "model.pt") in message and "finished run" in message and "\n" not in message
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(ModelFileError, match="does not exist"):
        hsic_ray.load_model(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()  # loading creates nothing

    (tmp_path / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError) as corrupt:
        hsic_ray.load_model(tmp_path)
    message = str(corrupt.value)
    assert str(tmp_path / "model.pt") in message and "corrupt" in message and "\n" not in message


def write_untrained_model(directory, input_shape=(1, 28, 28)):
    """A model.pt as a run writes it, of a freshly built network (no training: these tests are about loading)."""
    cfg = tiny(directory)
    network = build_network(cfg.model, input_shape)
    head = build_head(network.output_features, 10)
    directory.mkdir(parents=True, exist_ok=True)
    data = model_bytes(cfg, "hsic", input_shape, 10, network.state_dict(), head.state_dict())
    (directory / "model.pt").write_bytes(data)


def test_input_of_the_wrong_shape_names_the_expected_and_the_given_shape(tmp_path):
    write_untrained_model(tmp_path / "run")
    model = hsic_ray.load_model(tmp_path / "run")
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    for wrong, shown in ((torch.zeros(2, 784), "2 x 784"), (torch.zeros(2, 3, 28, 28), "2 x 3 x 28 x 28")):
        with pytest.raises(ModelInputError) as bad:
            model(wrong)
        message = str(bad.value)
        assert "N x 1 x 28 x 28 (C, H, W)" in message and f"given {shown}" in message and "\n" not in message
    assert issubclass(ModelInputError, ValueError) and ModelInputError in USER_ERRORS


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the message of a machine without CUDA")
def test_cuda_without_a_gpu_says_so_not_corrupt(tmp_path):
    write_untrained_model(tmp_path / "run")
    with pytest.raises(ConfigError, match="no CUDA device was found") as no_gpu:
        hsic_ray.load_model(tmp_path / "run", device="cuda")
    assert "corrupt" not in str(no_gpu.value)


def test_a_sweep_directory_names_its_trials_models(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "hsic-ray-run.json").write_text('{"kind": "sweep"}')
    (sweep / "results.csv").write_text("trial,accuracy\n")
    for trial in ("hsic-a", "hsic-b"):
        write_untrained_model(sweep / "trials" / trial)
    (sweep / "trials" / "hsic-c").mkdir()  # a trial that did not finish
    with pytest.raises(ModelFileError) as swept:
        hsic_ray.load_model(sweep)
    message = str(swept.value)
    assert "is a depth sweep" in message and "trials/hsic-a/model.pt, trials/hsic-b/model.pt" in message
    assert "hsic-c" not in message and "\n" not in message
    assert hsic_ray.load_model(sweep / "trials" / "hsic-a").method == "hsic"  # what the message points to loads
