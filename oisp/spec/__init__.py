"""The AI endpoint spec: which hosts, paths and keys belong to which AI provider.

The spec is data (``ai_endpoints.json`` beside this file), loaded from the
package by default; ``OISP_SPEC=/path/to/spec.json`` or ``load_spec(path)``
replaces it. Everything that needs to know "is this AI traffic, and in which
wire format?" asks a :class:`Spec`:

- the redirector: ``spec.hosts()`` (names to resolve) and
  ``spec.matches_host(sni)``;
- the decoder: ``spec.match(host, path, port=..., body=...)`` picks the
  provider, request type and wire format (``api``) of one HTTP request.

This package imports nothing else from oisp: it is a leaf every floor may use.
"""

from oisp.spec.model import Endpoint, EndpointMatch, Provider, Spec
from oisp.spec.loader import SPEC_ENV, default_spec, load_spec

__all__ = ["Endpoint", "EndpointMatch", "Provider", "Spec", "SPEC_ENV", "default_spec", "load_spec"]
