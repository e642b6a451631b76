import pytest

from lt_jax import cli


def test_every_command_has_help(capsys):
    parser, commands = cli.build_parser()
    assert set(commands) == {name for name, _, _ in cli.COMMANDS}
    for name in commands:
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        assert "usage: lt-jax" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["no-such-stage"])
    assert "invalid choice: 'no-such-stage'" in capsys.readouterr().err


def test_input_errors_print_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert cli.main(["select", "--in", str(missing), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lt-jax select: error:") and str(missing) in err and "Traceback" not in err
    # key=value overrides may come after flags, and a bad key names itself and what is allowed.
    assert cli.main(["select", "--in", str(missing), "max_per_problemx=2", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "max_per_problemx: unknown key; allowed:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["grade", "--help"], ["select", "--help"]])
def test_help_imports_only_the_command_it_shows(argv):
    """`lt-jax --help` imports no stage; one command's --help imports that stage alone, not JAX."""
    import json
    import subprocess
    import sys

    code = ("import json, sys\nfrom lt_jax import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'torch', 'transformers', 'lt_jax'))))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out.splitlines()[-1])
    assert not [m for m in loaded if m.split(".")[0] in ("jax", "torch", "transformers")], loaded
    stages = {module for _, module, _ in cli.COMMANDS}
    if argv[0] == "--help":
        assert not stages & set(loaded), loaded
    else:
        assert "lt_jax.data." + argv[0] in loaded and not {"lt_jax.train.trainer", "lt_jax.eval.cli"} & set(loaded)
