"""What a command prints when it refuses its input, read from pytest's captured stderr."""


def one_error_line(capsys, command: str, *needles: str) -> str:
    """The single stderr line `adaface-jax <command>: error: ...`, with no traceback, holding every needle."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"adaface-jax {command}: error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
