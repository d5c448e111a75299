"""The README's Python examples run as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write files (save/load)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block.replace("help(steerops.steer)", "pass"), "README.md", "exec"), {})


def test_readme_command_lines_run(tmp_path):
    """The text-in CLI lines run as written (in a fresh folder, tiny model built first)."""
    import shlex
    import subprocess
    import sys
    text = README.read_text()
    block = re.search(r"<!-- cli-example[^>]*-->\n```bash\n(.*?)```", text, re.S)
    assert block, "README lost its CLI example"
    lines = [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert [shlex.split(line)[1] for line in lines] == ["tiny-model", "patch", "attribute", "steer"]
    outputs = {}
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "steerops"
        run = subprocess.run([sys.executable, "-m", "steerops", *argv[1:]], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, (line, run.stderr[-3000:])
        outputs[argv[1]] = run.stdout
    assert (tmp_path / "patch-out" / "report.html").is_file()
    assert (tmp_path / "atp-out" / "patching.json").is_file()
    assert "rank agreement" in outputs["attribute"]
    assert re.search(r"unsteered\s+\| Tom", outputs["steer"])
    assert re.search(r"alpha 4\s+\| Mary", outputs["steer"])
