"""bgfn: a self-hosted server for Netlify-style functions."""

from bgfn.app import create_app
from bgfn.config import SiteConfig, load_site
from bgfn.discovery import Function, Registry, load_registry
from bgfn.errors import BgfnError, ConfigError, FunctionLoadError, FunctionNotFound, QueueUnavailable
from bgfn.event import LambdaContext, build_event
from bgfn.invoke import Invoker, Outcome
from bgfn.redis_server import RedisServer
from bgfn.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "BgfnError",
    "ConfigError",
    "Function",
    "FunctionLoadError",
    "FunctionNotFound",
    "Invoker",
    "LambdaContext",
    "Outcome",
    "QueueUnavailable",
    "RedisServer",
    "Registry",
    "Settings",
    "SiteConfig",
    "build_event",
    "create_app",
    "load_registry",
    "load_site",
]
