import json

import pytest

import latentdiffusion as ld
from latentdiffusion.cli.main import main

FAST = ["--quiet", "--sample.prompts=", "--data.holdout=2", "--checkpoint_every=0"]


def test_two_stages_end_to_end_give_a_loadable_model(tmp_path, capsys):
    ae_run, run = tmp_path / "ae", tmp_path / "ldm"
    assert (
        main(["train-autoencoder", "--preset", "tiny-autoencoder", "-o", str(ae_run), "--max_steps=2", *FAST])
        == 0
    )
    assert "model exported to" in capsys.readouterr().out
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--autoencoder",
                str(ae_run / "export"),
                "-o",
                str(run),
                "--max-steps=2",
                "--optim.lr=2e-3",
                *FAST,
            ]
        )
        == 0
    )
    saved = json.loads((run / "config.json").read_text())
    assert saved["autoencoder"] == str(ae_run / "export") and saved["optim"]["lr"] == 2e-3
    assert saved["model"]["autoencoder"]["scaling_factor"] != 0.18215  # measured by the autoencoder run
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][:2] == [
        1,
        2,
    ]
    pipe = ld.load(str(run / "export"))
    image = pipe.generate("a red circle on a blue background", steps=2, width=32, height=32)[0]
    assert image.size == (32, 32)
    # --resume reads the run's own config; raising max_steps continues it.
    assert main(["train", "-o", str(run), "--resume", "--max_steps=3", "--quiet"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-2])["step"] == 3


def test_show_config_prints_the_resolved_config(capsys):
    assert main(["train", "--preset", "tiny", "--show-config", "--model.unet.model_channels=64"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["model"]["unet"]["model_channels"] == 64 and config["task"] == "diffusion"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--preset", "shapes", "--show-config"], "needs a trained autoencoder"),
        (["train", "--preset", "tiny", "--optim.lr=fast"], "bad value for optim.lr"),
        (["train-autoencoder", "--preset", "tiny"], "trains the diffusion, not the autoencoder"),
        (
            ["train", "--preset", "tiny", "--data.dataset=imagefolder", "--data.path=/nonexistent"],
            "does not exist",
        ),
        (["train", "--autoencoder", "/nonexistent"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, capsys, tmp_path):
    code = main([*args, "-o", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_config_file_with_a_preset_and_overrides(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"preset": "tiny", "optim": {"lr": 0.01}, "batch_size": 3}))
    assert main(["train", str(path), "--show-config", "--batch_size=4"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["optim"]["lr"] == 0.01 and config["batch_size"] == 4
    path.write_text("{not json")
    assert main(["train", str(path), "--show-config"]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_unknown_key_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "tiny", "--optim.learning_rate=1"])
    assert exit_info.value.code == 2 and "--optim.learning_rate" in capsys.readouterr().err
