"""The private kombu and Celery attributes pipeq's broker layer relies on, checked at start.

Every override of a kombu or Celery internal lives in ``pipeq.worker.broker``. They were
written for the versions below; a newer kombu or Celery may rename what they override, and
an override of a name that no longer exists silently does nothing. A worker checks every one
of them before it consumes anything and refuses to start, naming what is missing.
"""

from __future__ import annotations

from importlib.metadata import version

#: The versions the broker layer was written and tested for.
WRITTEN_FOR = {"kombu": "5.7", "celery": "5.7"}

#: (module, class, attributes) that pipeq overrides or reads.
REQUIRED: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("kombu.transport.redis", "Channel", (
        "_create_client", "_do_restore_message", "_lookup", "_brpop_start", "_brpop_read",
        "_get", "_put", "_q_for_pri", "_flush_brpop_reauth", "QoS", "Message", "conn_or_acquire",
        "pool", "_get_message_priority")),
    ("kombu.transport.redis", "QoS", (
        "append", "ack", "unacked_key", "unacked_index_key", "_remove_from_indices",
        "restore_visible")),
    ("kombu.transport.virtual", "QoS", ("append", "ack", "_delivered", "_dirty")),
    ("kombu.transport.redis", "Transport", ("Channel",)),
    ("kombu.transport.redis", "SentinelChannel", ("_sentinel_managed_pool",)),
    ("kombu.transport.redis", "SentinelTransport", ("Channel",)),
    ("celery.worker.consumer", "Consumer", (
        "on_send_event_buffered", "_flush_events", "on_decode_error", "on_unknown_message",
        "on_invalid_task", "create_task_handler", "ensure_connected")),
    ("celery.worker.state", "", ("reserved_requests", "active_requests")),
)


def missing_internals() -> list[str]:
    """Dotted names of the required internals this kombu and Celery lack ([] when fine)."""
    import importlib

    missing = []
    for module_name, class_name, attributes in REQUIRED:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        owner = getattr(module, class_name, None) if class_name else module
        if owner is None:
            missing.append(f"{module_name}.{class_name}")
            continue
        where = f"{module_name}.{class_name}" if class_name else module_name
        missing += [f"{where}.{name}" for name in attributes if not hasattr(owner, name)]
    return missing


def check_broker_internals() -> None:
    """Raise RuntimeError naming every missing internal and the versions pipeq expects."""
    missing = missing_internals()
    if not missing:
        return
    installed = ", ".join(f"{name} {version(name)}" for name in WRITTEN_FOR)
    expected = ", ".join(f"{name} {v}.x" for name, v in WRITTEN_FOR.items())
    raise RuntimeError(
        f"pipeq's broker layer (pipeq.worker.broker) was written for {expected}; the installed "
        f"{installed} lacks {', '.join(missing)}. Install the versions pipeq pins "
        "(pip install 'pipeq[worker]') or upgrade pipeq")
