"""Stand-in for get-pip.py, which ansible-test uses to put pip into its sanity venvs.

ansible-test fetches get-pip.py from a CI file host that this project's CI cannot reach,
but first looks for a cached copy in ~/.ansible/test/cache/get_pip_<version>.py.
scripts/sanity installs this file there. Like get-pip.py it takes pip install arguments
(for example `pip==24.2 --no-setuptools --no-wheel`): it bootstraps pip with ensurepip and
then installs the requested packages from the configured package index.
"""

import subprocess
import sys

args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"], stdout=subprocess.DEVNULL)
subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", *args])
