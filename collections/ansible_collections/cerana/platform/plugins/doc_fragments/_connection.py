# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.

from __future__ import annotations


class ModuleDocFragment:
    # Keep in step with CONNECTION_ARGSPEC in module_utils/_ansible.py.
    DOCUMENTATION = r"""
options:
  consul_url:
    description:
      - Address of the Consul HTTP API, as C(host:port) or C(http(s)://host:port).
      - Falls back to the E(CONSUL_HTTP_ADDR) environment variable, as the C(consul) CLI does.
    type: str
    default: http://127.0.0.1:8500
  consul_token:
    description:
      - ACL token sent with every request.
      - Falls back to E(CONSUL_HTTP_TOKEN).
    type: str
  validate_certs:
    description:
      - Whether to verify the TLS certificate of an C(https) address.
      - Falls back to E(CONSUL_HTTP_SSL_VERIFY).
    type: bool
    default: true
  ca_path:
    description:
      - CA bundle used to verify the server certificate. Falls back to E(CONSUL_CACERT).
    type: path
  client_cert:
    description:
      - Client certificate for mutual TLS. Falls back to E(CONSUL_CLIENT_CERT).
    type: path
  client_key:
    description:
      - Key of O(client_cert). Falls back to E(CONSUL_CLIENT_KEY).
    type: path
  kv_prefix:
    description:
      - Key prefix under which the platform keeps its state. Falls back to E(CERANA_KV_PREFIX).
      - Set it to an empty string to address the KV root (only meaningful for M(cerana.platform.kv)).
    type: str
    default: cerana
  consul_timeout:
    description:
      - Seconds to wait for Consul to connect and answer each request.
    type: float
    default: 10.0
notes:
  - Needs the C(py-consul) Python library where the module runs (usually the controller, through C(delegate_to=localhost) or a play on V(localhost)).
"""

    ACTIONGROUP = r"""
attributes:
  action_group:
    description: Use C(group/cerana.platform.platform) in C(module_defaults) to set the connection options once.
    support: full
    membership:
      - cerana.platform.platform
"""

    ATTRIBUTES = r"""
attributes:
  check_mode:
    description: Can run in check mode and return the predicted object and diff without writing.
    support: full
  diff_mode:
    description: Returns the stored object before and the declared object after, in diff mode.
    support: full
  idempotent:
    description: A second run with the same options reports C(changed=false).
    support: full
"""

    INFO_ATTRIBUTES = r"""
attributes:
  check_mode:
    description: Reads only; runs the same in check mode.
    support: full
  diff_mode:
    description: Reads only; there is nothing to diff.
    support: N/A
  idempotent:
    description: Reads only.
    support: full
"""
