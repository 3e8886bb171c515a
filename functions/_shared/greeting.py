"""Helper code: `_`-prefixed entries are never functions, but functions can import them."""


def greet(name: str) -> str:
    return f"Hello, {name}!"
