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
