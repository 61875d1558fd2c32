from conftest import run_cli


def test_help_lists_commands() -> None:
    result = run_cli("--help")
    assert result.exit_code == 0
    assert "merge" in result.stdout
