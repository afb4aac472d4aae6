from vppmesh.cli import app

app(prog_name="vppmesh")
