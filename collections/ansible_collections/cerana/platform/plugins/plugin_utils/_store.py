# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""The state store for controller-side plugins (lookup, inventory): options in, AnsibleError out."""

from __future__ import annotations

from ansible.errors import AnsibleError

from ansible_collections.cerana.platform.plugins.module_utils._store import (
    ConnectionSettings,
    Store,
    StoreError,
)


def store_from_plugin(plugin):
    """A Store configured from a plugin's connection options (the same names as the modules')."""
    try:
        return Store(
            ConnectionSettings(
                address=plugin.get_option("consul_url"),
                token=plugin.get_option("consul_token") or None,
                validate_certs=plugin.get_option("validate_certs"),
                ca_path=plugin.get_option("ca_path"),
                client_cert=plugin.get_option("client_cert"),
                client_key=plugin.get_option("client_key"),
                prefix=plugin.get_option("kv_prefix") or "",
                timeout=plugin.get_option("consul_timeout"),
            )
        )
    except StoreError as e:
        raise AnsibleError(str(e)) from e
