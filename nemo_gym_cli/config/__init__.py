"""Config: composition of layers (compose), secrets, paths and URL lists, the server graph (specs)."""

from nemo_gym_cli.config.compose import Composed, ConfigError, compose, dump_yaml, load_yaml, parse_overrides
from nemo_gym_cli.config.paths import CONF_DIR, PROJECT_ROOT, parse_url_list, resolve_path, search_roots
from nemo_gym_cli.config.secrets import is_secret_key, mask_secrets, secret_values
from nemo_gym_cli.config.specs import (AGENT_SERVERS, MODEL_SERVERS, RESOURCES_SERVERS, SERVER_TYPES, ServerSpec, head_address,
                                       head_url, server_specs, validate_servers)

__all__ = [
    "AGENT_SERVERS", "MODEL_SERVERS", "RESOURCES_SERVERS", "CONF_DIR", "PROJECT_ROOT", "SERVER_TYPES", "Composed", "ConfigError",
    "ServerSpec", "compose", "dump_yaml",
    "head_address", "head_url", "is_secret_key", "load_yaml", "mask_secrets", "parse_overrides", "parse_url_list", "resolve_path",
    "search_roots", "secret_values", "server_specs", "validate_servers",
]
