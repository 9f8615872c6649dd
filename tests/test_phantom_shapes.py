"""Each hemorrhage subtype has its shape signature (lens, crescent, thin, dependent, ...)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import label, regionprops

from phantom_helpers import study


def _largest_slice_region(mask):
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    lab = label(mask[k])
    return max(regionprops(lab), key=lambda r: r.area)


def _plates(h):
    """Signs of the coronal and lambdoid suture planes (bone plate a voxel lies under)."""
    cor = np.sign((h[:, 1] + 20.0) - 0.137 * (h[:, 2] - 63.0))
    lam = np.sign((h[:, 1] - 75.0) - 0.267 * (h[:, 2] - 45.0))
    return cor, lam


def test_epidural_is_a_lens_that_never_crosses_a_suture():
    sites = set()
    for seed in (31, 32, 33, 34):
        st = study(seed, ("epidural",), matrix=256, lesion_ml=(("epidural", 40.0),))
        m = st.masks["epidural"]
        assert m.sum() > 100, seed
        sites.add(st.truth["lesions"][0]["site"])
        cor, lam = _plates(st.head_coords(m))
        assert len(set(cor)) == 1 and len(set(lam)) == 1, f"seed {seed} crosses a suture"
        if st.truth["lesions"][0]["site"] in ("temporal", "parietal"):
            side = np.sign(st.head_coords(m)[:, 0])
            assert len(set(side)) == 1  # nor across the sagittal suture (frontal bone: may)
        # biconvex lens: the largest cross-section is convex (no concave inner margin)
        assert _largest_slice_region(m).solidity > 0.8, seed
    assert len(sites) >= 2


def test_subdural_is_a_crescent_on_one_side_and_may_cross_sutures():
    st = study(41, ("subdural",), matrix=256, lesion_ml=(("subdural", 60.0),), sdh_age="acute")
    m = st.masks["subdural"]
    h = st.head_coords(m)
    assert len(set(np.sign(h[:, 0]))) == 1  # stops at the falx
    region = _largest_slice_region(m)
    assert region.solidity < 0.8  # crescent: concave along the brain (EDH: > 0.8)
    minor, major = region.axis_minor_length, region.axis_major_length
    assert major > 4 * minor  # long and thin
    # lies against the inner table
    skull = st.masks["skull"]
    near = ndimage.binary_dilation(skull, np.ones((1, 5, 5), bool))
    assert (m & near).sum() > 0.15 * m.sum()
    crossed = [len(set(v)) > 1 for v in _plates(h)]
    assert any(crossed)  # wide enough to pass under a suture (unlike EDH)


def test_subacute_subdural_is_near_isodense_and_acute_hyperdense():
    med = {}
    for age in ("subacute", "acute"):
        st = study(42, ("subdural",), matrix=256, lesion_ml=(("subdural", 50.0),), sdh_age=age)
        inner = ndimage.binary_erosion(st.masks["subdural"], np.ones((1, 3, 3), bool))
        assert inner.sum() > 20
        med[age] = float(np.median(st.volume.hu[inner]))
    assert 22 <= med["subacute"] <= 46  # close to grey matter (partial volume at thin edges)
    assert med["acute"] >= 48 and med["acute"] > med["subacute"] + 15


def test_subarachnoid_is_thin_and_in_csf_spaces():
    for seed, pattern in ((43, "convexity"), (46, "basal")):
        st = study(seed, ("subarachnoid",), matrix=256, lesion_ml=(("subarachnoid", 8.0),),
                   extra=(("sah_pattern", pattern),))
        m = st.masks["subarachnoid"]
        assert m.sum() > 30
        assert (m & st.masks["brain"]).sum() == m.sum()
        assert not (m & (st.masks["ventricle_left"] | st.masks["ventricle_right"])).any()
        h = st.head_coords(m)
        if pattern == "convexity":  # sulcal blood: a lining, never a mass
            pix = st.geometry.pixel
            thick = max(ndimage.distance_transform_edt(s).max() for s in m if s.any()) * pix
            assert thick <= 3.5
        else:  # basal cisterns around the circle of Willis and the Sylvian fissures
            assert abs(np.median(h[:, 0])) < 15 and np.median(h[:, 2]) < 5


def test_intraventricular_blood_layers_dependently_inside_ventricles():
    st = study(44, ("intraventricular",), matrix=256, lesion_ml=(("intraventricular", 8.0),),
               yaw_deg=12.0, roll_deg=-8.0, pitch_deg=15.0)
    m = st.masks["intraventricular"]
    vent = st.masks["ventricle_left"] | st.masks["ventricle_right"] | st.masks["ventricle_other"]
    assert m.sum() > 50
    assert (m & vent).sum() >= 0.98 * m.sum()
    # dependent = posterior in a supine patient: patient +y, whatever the head pose
    aff = st.volume.affine

    def mean_y(mask):
        k, j, i = np.nonzero(mask)
        return float(np.mean(aff[1, 0] * i + aff[1, 1] * j + aff[1, 2] * k + aff[1, 3]))

    assert mean_y(m) > mean_y(vent) + 3.0


def test_intraparenchymal_is_a_compact_clot_in_the_brain():
    st = study(45, ("intraparenchymal",), matrix=256, lesion_ml=(("intraparenchymal", 25.0),))
    m = st.masks["intraparenchymal"]
    assert (m & st.masks["brain"]).sum() == m.sum()
    assert not (m & (st.masks["ventricle_left"] | st.masks["ventricle_right"])).any()
    lab, n = ndimage.label(m)
    sizes = ndimage.sum_labels(m, lab, range(1, n + 1))
    assert sizes.max() > 0.9 * m.sum()  # one clot
    assert _largest_slice_region(m).solidity > 0.7
