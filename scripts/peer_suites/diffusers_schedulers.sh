#!/usr/bin/env bash
# Run diffusers' own DDIMSchedulerTest and DDPMSchedulerTest against hf_ext's UDMScheduler (and, as a control, against
# diffusers' classes). diffusers ships its tests only in its repository, so give a checkout of it:
#   scripts/peer_suites/diffusers_schedulers.sh /path/to/diffusers [extra pytest arguments]
# Uses the python of $VENV (default .venv). Nothing in the checkout is modified; the run happens in a temporary folder.
set -euo pipefail
checkout=${1:?usage: $0 /path/to/diffusers-checkout [pytest args]}
shift
python="$(cd "$(dirname "$0")/../.." && pwd)/${VENV:-.venv}/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tests/schedulers" "$work/tests/others"
cp "$checkout"/tests/__init__.py "$checkout"/tests/testing_utils.py "$work/tests/"
cp "$checkout"/tests/others/__init__.py "$checkout"/tests/others/test_utils.py "$work/tests/others/"
cp "$checkout"/tests/schedulers/{__init__,test_schedulers,test_scheduler_ddim,test_scheduler_ddpm}.py "$work/tests/schedulers/"
cat > "$work/test_udm_as_ddpm_and_ddim.py" <<'PY'
import hf_ext  # noqa: F401
from hf_ext.schedulers import UDMScheduler
from tests.schedulers import test_scheduler_ddim, test_scheduler_ddpm  # modules, so pytest collects each class once


class TestUDMAsDDIM(test_scheduler_ddim.DDIMSchedulerTest):
    scheduler_classes = (UDMScheduler,)  # DDIM's configuration as it is: UDM's default eta is 0


class TestUDMAsDDPM(test_scheduler_ddpm.DDPMSchedulerTest):
    scheduler_classes = (UDMScheduler,)

    def get_scheduler_config(self, **kwargs):
        return {"eta": 1.0, **super().get_scheduler_config(**kwargs)}  # eta = 1 is DDPM
PY
cd "$work"
echo "== UDMScheduler in diffusers' DDIM/DDPM scheduler tests"
"$python" -m pytest -q -p no:cacheprovider -rf --tb=line test_udm_as_ddpm_and_ddim.py "$@" || true
echo "== control: diffusers' own DDIMScheduler/DDPMScheduler"
"$python" -m pytest -q -p no:cacheprovider -rf --tb=line tests/schedulers/test_scheduler_ddim.py::DDIMSchedulerTest \
  tests/schedulers/test_scheduler_ddpm.py::DDPMSchedulerTest "$@" || true
