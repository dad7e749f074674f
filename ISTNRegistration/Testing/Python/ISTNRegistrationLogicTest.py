"""In-Slicer unit tests of the ISTN Registration logic (registered with ctest; runs inside Slicer only).

The checks themselves are in `ISTNRegistrationLib.selftest`, shared with the
headless test suite that runs them on slicer-core (Testing/test_slicer_logic.py).
"""

import os
import sys
import tempfile
import unittest

import slicer

_MODULE_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if _MODULE_DIR not in sys.path:
    sys.path.append(_MODULE_DIR)

from ISTNRegistrationLib import ISTNRegistrationLogic, dependencies  # noqa: E402


@unittest.skipIf(dependencies.missingPackages(), "torch/scipy are not installed in this Slicer")
class ISTNRegistrationLogicTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from ISTNRegistrationLib import selftest

        cls.models = selftest.makeTinyModels(tempfile.mkdtemp(prefix="istn-logic-test-"))

    def setUp(self):
        slicer.mrmlScene.Clear()

    def test_affine_and_bspline_geometry(self):
        from ISTNRegistrationLib import selftest

        report = selftest.checkAffineAndBSpline(ISTNRegistrationLogic(), slicer.mrmlScene, self.models)
        self.assertLess(max(report.values()), 1e-3)

    def test_cancel_leaves_scene_unchanged(self):
        from ISTNRegistrationLib import selftest

        selftest.checkCancelLeavesSceneUnchanged(ISTNRegistrationLogic(), slicer.mrmlScene, self.models)

    def test_quality_volumes(self):
        from ISTNRegistrationLib import selftest

        selftest.checkQualityVolumes(ISTNRegistrationLogic(), slicer.mrmlScene, self.models)


def runTest():
    suite = unittest.TestLoader().loadTestsFromTestCase(ISTNRegistrationLogicTest)
    return unittest.TextTestRunner(verbosity=2).run(suite).wasSuccessful()


if __name__ == "__main__":
    unittest.main()
