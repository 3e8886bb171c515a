from bgfn.cli import main

main(prog_name="bgfn")
