from mtdpo.cli import app

app(prog_name="mtdpo")
