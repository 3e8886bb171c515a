"""A function that raises: bgfn answers 502 with {"errorType", "errorMessage"}."""


class InventoryError(Exception):
    pass


def handler(event, context):
    raise InventoryError("the warehouse is on fire")
