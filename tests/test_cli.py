from open_mythos.cli import main


def test_demo_runs(capsys):
    assert main(["demo", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "rho(A)" in out and "n_loops= 8" in out


def test_variants_table(capsys):
    assert main(["variants"]) == 0
    assert "mythos_1t" in capsys.readouterr().out
