"""Publishing: the one way into the resource cache (see publisher.py)."""

from meshpilot.publish.debounce import Debouncer
from meshpilot.publish.mesh import MeshPolicy, MeshProducer, NoPolicy
from meshpilot.publish.publisher import Bundle, Changes, Output, Producer, Publisher

__all__ = ["Bundle", "Changes", "Debouncer", "MeshPolicy", "MeshProducer", "NoPolicy", "Output", "Producer", "Publisher"]
