"""One reader for every configuration Pointsman takes: YAML files, flags and pod annotations.

    file --load_yaml_file--> plain data --with_flags--> plain data --read--> frozen dataclass

`load_yaml` refuses a key given twice in one mapping, at any depth. `read` takes the field list
(names, types, defaults) from the dataclass itself, and bounds and checks from each field's
metadata (`rule`), so a config class is the whole description of what its file may hold:

    @dataclass(frozen=True, slots=True)
    class Example:
        listen: str = field(default="127.0.0.1:8101", metadata=rule(check=host_port))
        interval_s: float = field(default=1.0, metadata=rule(above=0))
        instances: tuple[Instance, ...] = ()

    read(Example, {"interval_s": 0.5})

Every error is a ConfigError whose message starts with the field's path and says what the field
must be: `instances[1].grpc: must be host:port, got 'triton-1'`,
`refresh_interval_s: must be a finite number > 0, got nan`. Keys the class does not know are
refused by name.

Types: bool (true or false only), int (not a bool, not 1.5), float (finite; an int is taken),
str, Path, Enum (by value), Literal, `X | None`, `tuple[X, ...]` (a lone scalar is a list of one),
`Mapping[str, X]`, nested dataclasses, and Any (taken as it is). A null value means the field's
default. With `text=True` (pod annotations) scalars arrive as strings and are parsed by type.
A type the reader should not read by shape (a TLS block, a version split) gets a hook: `hooks`
maps a type to `(value, path) -> value`, and `rule(parse=...)` does the same for one field.

Command-line flags take the same path: a flag added with `dest=flag_dest("tls.cert_file")`
(`append=True` adds to a list) is laid over the file's plain data by `with_flags`, then read.
"""

from pointsman.config._flags import flag_dest, relative_files, with_flags
from pointsman.config._reader import Hooks, keys_of, read, read_fields, read_value, validate
from pointsman.config._rules import (
    Rule,
    host_port,
    http_url,
    metadata_key,
    non_empty,
    or_empty,
    rule,
)
from pointsman.config._yaml import load_yaml, load_yaml_file

__all__ = [
    "Hooks",
    "Rule",
    "flag_dest",
    "host_port",
    "http_url",
    "keys_of",
    "load_yaml",
    "load_yaml_file",
    "metadata_key",
    "non_empty",
    "or_empty",
    "read",
    "read_fields",
    "read_value",
    "relative_files",
    "rule",
    "validate",
    "with_flags",
]
