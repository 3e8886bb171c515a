"""bgfn's benchmark suite: `bench/run` (see bench/README.md). Nothing here is imported by bgfn."""
