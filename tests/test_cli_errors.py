"""A user's mistake is one line on stderr (`error: …`) and exit status 2, for every entry point; a bug keeps its
traceback; an interrupted write leaves nothing that looks finished (issue 24)."""

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models.errors import OutputExistsError, UserError
from models.files import atomic_path, write_text

REPO = Path(__file__).resolve().parents[1]
TWO = 'prompts=["a red circle on a black background","a blue circle on a black background"]'
HYDRA_SCRIPTS = (
    "generate",
    "edit",
    "edit_image",
    "figure",
    "ablate",
    "bench",
    "app",
    "train_tiny",
    "eval_tiny",
    "eval_edits",
    "eval_inversion",
    "eval_joint",
    "bench_checkpointing",
)


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args], cwd=cwd, capture_output=True, text=True, timeout=1200
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    pickled = folder / "model.ckpt"
    pickled.write_bytes(pickle.dumps({"state_dict": {}}))
    corrupt = folder / "corrupt.safetensors"
    corrupt.write_bytes((REPO / "models" / "weights" / "tiny.safetensors").read_bytes()[:5000])
    not_an_image = folder / "notes.png"
    not_an_image.write_text("not an image")
    return {"ckpt": pickled, "corrupt": corrupt, "not_an_image": not_an_image, "missing": folder / "missing.png"}


# The ten mistakes of issue 24, each with the words its one line must hold.
MISTAKES = {
    "replace with different word counts": (
        "edit.py",
        ['prompts=["a red circle","a big blue circle"]', "edit=replace"],
        ["same number of words"],
    ),
    "reweight word not in the prompt": (
        "edit.py",
        ['prompts=["a red circle","a red circle"]', "edit=reweight", "edit.reweight={dog: 2}"],
        ["'dog'", "not in prompt"],
    ),
    "prompt over the token limit": ("generate.py", ['prompts=["' + " ".join(["red"] * 80) + '"]'], ["at most"]),
    "height not a multiple": ("generate.py", ["height=30"], ["height=30", "multiple of 4"]),
    "steps=0": ("generate.py", ["steps=0"], ["steps=0"]),
    "missing checkpoint": ("generate.py", ["model=sd15", "model.checkpoint=@missing"], ["missing.png", "not exist"]),
    "pickled checkpoint": ("generate.py", ["model=sd15", "model.checkpoint=@ckpt"], ["refusing to unpickle"]),
    "corrupt safetensors": ("generate.py", ["model.checkpoint=@corrupt"], ["cannot read as safetensors"]),
    "missing image": ("edit_image.py", ["image=@missing", TWO], ["missing.png", "does not exist"]),
    "file that is not an image": ("edit_image.py", ["image=@not_an_image", TWO], ["notes.png", "as an image"]),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_user_mistake_is_one_line_and_status_2(mistake, bad_files, tmp_path):
    script, args, expected = MISTAKES[mistake]
    args = [re.sub(r"@(\w+)", lambda name: str(bad_files[name[1]]), a) for a in args]  # @missing → its path
    result = run(script, *args, "progress=false", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert_one_line_error(result, *expected)
    assert not any((tmp_path / "run").glob("*.png"))  # nothing was written for a refused request


@pytest.mark.parametrize("script", HYDRA_SCRIPTS)
def test_every_entry_point_names_a_misspelt_setting(script, tmp_path):
    assert_one_line_error(run(f"{script}.py", "devise=cpu", cwd=tmp_path), "devise", "did you mean device?")


def test_hydra_errors_name_the_choices_the_closest_one_and_the_nested_key(tmp_path):
    assert_one_line_error(run("generate.py", "model=sd99", cwd=tmp_path), "model=sd99 is not a choice", "sd15, sd21")
    assert_one_line_error(run("edit.py", "edit=replce", cwd=tmp_path), "did you mean edit=replace?", "refine")
    assert_one_line_error(
        run("edit.py", "edit.cross_replace_step=1", cwd=tmp_path), "did you mean edit.cross_replace_steps?"
    )
    assert_one_line_error(run("edit.py", "prompts=[a", cwd=tmp_path), "[a")


def test_aggregate_names_a_missing_folder(tmp_path):
    assert_one_line_error(run("aggregate.py", str(tmp_path / "nowhere"), cwd=tmp_path), "nowhere")


@pytest.fixture()
def toy_script(tmp_path) -> Path:
    """An entry point whose job does what `mode=` says: a user error, a bug, Ctrl-C, or a finished write."""
    script = tmp_path / "toy.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from scripts._cli import entry_point
from models.errors import UserError
from models.files import write_text

@entry_point("generate")
def main(cfg):
    mode = cfg.negative_prompt
    if mode == "user":
        raise UserError("seed=-1 is out of range; use an integer >= 0")
    if mode == "bug":
        return {{}}["missing key"]
    if mode == "ctrl-c":
        raise KeyboardInterrupt
    write_text({str(tmp_path / "done.txt")!r}, "finished")

main()
""")
    return script


def _toy(script: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), f"negative_prompt={mode}", f"hydra.run.dir={script.parent}/r"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=script.parent,
    )


def test_a_user_error_raised_anywhere_in_a_job_is_one_line(toy_script):
    assert_one_line_error(_toy(toy_script, "user"), "seed=-1 is out of range")


def test_a_bug_keeps_its_full_traceback(toy_script):
    result = _toy(toy_script, "bug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "KeyError: 'missing key'" in result.stderr
    assert "toy.py" in result.stderr  # the frame of the bug is shown, not stripped by Hydra
    assert "HYDRA_FULL_ERROR" not in result.stderr


def test_ctrl_c_is_one_line_and_status_130(toy_script):
    result = _toy(toy_script, "ctrl-c")
    assert result.returncode == 130 and result.stderr.strip() == "error: interrupted", result.stderr


def test_a_finished_job_exits_0(toy_script):
    assert _toy(toy_script, "fine").returncode == 0 and (toy_script.parent / "done.txt").read_text() == "finished"


# --- files are written completely or not at all ----------------------------------------------------------------


@pytest.mark.parametrize("interruption", [RuntimeError("a bug halfway"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_no_file(tmp_path, interruption):
    target = tmp_path / "grid.png"
    with pytest.raises(type(interruption)):
        with atomic_path(target) as partial:
            partial.write_bytes(b"\x89PNG half")
            raise interruption
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file


def test_a_finished_write_appears_whole_and_is_never_overwritten(tmp_path):
    target = write_text(tmp_path / "config.yaml", "seed: 1\n")
    assert target.read_text() == "seed: 1\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    with pytest.raises(OutputExistsError, match="refusing to overwrite"):
        write_text(target, "seed: 2\n")
    assert target.read_text() == "seed: 1\n"
    assert write_text(target, "seed: 2\n", overwrite=True).read_text() == "seed: 2\n"


def test_the_temporary_file_keeps_the_suffix_so_writers_infer_the_format(tmp_path):
    from PIL import Image

    with atomic_path(tmp_path / "tile.png") as partial:
        assert partial.suffix == ".png" and partial.name.startswith(".")
        Image.new("RGB", (4, 4)).save(partial)
    assert Image.open(tmp_path / "tile.png").format == "PNG"


def test_user_errors_are_value_errors_and_the_file_kinds_keep_their_builtin_types():
    from models.errors import MissingFileError, WrongTypeError

    assert issubclass(UserError, ValueError)
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(OutputExistsError, FileExistsError)
    assert issubclass(WrongTypeError, TypeError)
    assert all(issubclass(kind, UserError) for kind in (MissingFileError, OutputExistsError, WrongTypeError))
