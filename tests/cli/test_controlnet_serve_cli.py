"""``ldm serve --controlnet-dir``: a path that is not a folder is one line, exit 2, before any loading."""

from latentdiffusion.cli.main import main


def test_controlnet_dir_must_be_a_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["serve", "--model", "preset:tiny", "--controlnet-dir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--controlnet-dir {missing} is not a folder" in err and len(err.strip().splitlines()) == 1
