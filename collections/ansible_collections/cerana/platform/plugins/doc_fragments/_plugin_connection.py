# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.

from __future__ import annotations


class ModuleDocFragment:
    # The connection options of controller-side plugins (lookup, inventory): the same names as the
    # modules' options, with environment fallbacks declared the way plugins declare them.
    DOCUMENTATION = r"""
options:
  consul_url:
    description: Address of the Consul HTTP API, as C(host:port) or C(http(s)://host:port).
    type: str
    default: http://127.0.0.1:8500
    env:
      - name: CONSUL_HTTP_ADDR
  consul_token:
    description: ACL token sent with every request.
    type: str
    env:
      - name: CONSUL_HTTP_TOKEN
  validate_certs:
    description: Whether to verify the TLS certificate of an C(https) address.
    type: bool
    default: true
    env:
      - name: CONSUL_HTTP_SSL_VERIFY
  ca_path:
    description: CA bundle used to verify the server certificate.
    type: path
    env:
      - name: CONSUL_CACERT
  client_cert:
    description: Client certificate for mutual TLS.
    type: path
    env:
      - name: CONSUL_CLIENT_CERT
  client_key:
    description: Key of O(client_cert).
    type: path
    env:
      - name: CONSUL_CLIENT_KEY
  kv_prefix:
    description: Key prefix under which the platform keeps its state; an empty string addresses the KV root.
    type: str
    default: cerana
    env:
      - name: CERANA_KV_PREFIX
  consul_timeout:
    description: Seconds to wait for Consul to connect and answer each request.
    type: float
    default: 10.0
"""
