"""On-disk fixtures for the evaluation tests (IJB meta files, IJB-S CS6 CSVs, TinyFace trees)."""
import numpy as np

from evaluation import ijb, ijbs


# ---- fixture on disk (the IJB layout) ---------------------------------------------------------------------

def write_meta(root, ds="IJBC", *, names=None, lm_lines=None, tid_mid=None, pairs=None, g1=None, g2=None, probe=None):
    meta = root / ds / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    lo = ds.lower()
    gn = ijb.GALLERY_NAMES[ds]
    (meta / f"{lo}_name_5pts_score.txt").write_text("\n".join(lm_lines) + "\n")
    (meta / f"{lo}_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    (meta / f"{lo}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    for fname, rows in ((f"{lo}_1N_gallery_{gn[0]}.csv", g1), (f"{lo}_1N_gallery_{gn[1]}.csv", g2),
                        (f"{lo}_1N_probe_mixed.csv", probe)):
        if rows is not None:
            (meta / fname).write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "\n".join(rows) + "\n")
    return meta


LM = "46.060 62.026 87.785 60.323 68.851 77.656 52.162 99.875 86.450 98.648 0.999"

# 8 images; template 10: media 1 (imgs 0,1) + media 2 (img 2); template 20: img 3;
# template 30: media 5 (imgs 4,5); template 40: img 6; template 50: img 7
TID_MID = ["a.jpg 10 1", "b.jpg 10 1", "c.jpg 10 2", "d.jpg 20 3", "e.jpg 30 5", "f.jpg 30 5",
           "g.jpg 40 6", "h.jpg 50 7"]


def small_meta(tmp_path, **over):
    kw = dict(lm_lines=[f"{n.split()[0]} {LM}" for n in TID_MID], tid_mid=TID_MID,
              pairs=["10 20 1", "10 30 0", "20 30 0", "40 50 1", "10 40 0", "30 50 1"],
              g1=["10,100,a.jpg", "10,100,b.jpg", "30,300,e.jpg"], g2=["40,400,g.jpg"],
              probe=["20,100,d.jpg", "50,400,h.jpg"])
    kw.update(over)
    write_meta(tmp_path, **kw)
    return ijb.load_meta(str(tmp_path), "IJBC")


FEATS = np.array([[1, 0], [3, 0], [0, 2], [1, 1], [0, 1], [0, 3], [1, -1], [2, -1]], np.float32)


META = ["1,videos/100.mp4,a", "2,videos/100.mp4,a", "1,videos/101.mp4,a", "3,videos/102.mp4,a",
        "2,videos/103.mp4,a", "1,img/11.jpg,a", "2,img/12.jpg,a", "3,img/13.jpg,a", "4,img/14.jpg,a",
        "1,img/15.jpg,a", "1,videos/101.mp4,b"]  # duplicate (subject, video) row -> one template
IMAGES = ["1/videos_100_0.jpg", "1/videos_100_5.jpg", "2/videos_100_0.jpg", "1/videos_101_3.jpg",
          "3/videos_102_1.jpg", "2/videos_103_7.jpg", "1/img_11.jpg", "2/img_12.jpg", "3/img_13.jpg",
          "4/img_14.jpg", "1/img_15.jpg"]


def write_protocol(root, **over):
    files = {
        "cs6_metadata.csv": META,
        "cs6_surveillance_to_single-booking_probe.csv": ["videos/100.mp4", "videos/102.mp4"],
        "cs6_surveillance_to_surveillance_probe.csv": ["videos/100.mp4"],
        "cs6_uav_to_single-booking_probe.csv": ["videos/102.mp4", "img/12.jpg", "img/15.jpg"],
        "galleries/cs6_surveillance_to_surveillance_g1.csv": ["0,1,videos/101.mp4,x"],
        "galleries/cs6_surveillance_to_surveillance_g2.csv": ["0,2,videos/103.mp4,x"],
        "galleries/cs6_surveillance_to_single_g1.csv": ["0,1,img/11.jpg", "0,2,img/12.jpg"],
        "galleries/cs6_surveillance_to_single_g2.csv": ["0,3,img/13.jpg", "0,4,img/14.jpg"],
        "galleries/cs6_surveillance_to_booking_g1.csv": ["0,1,img/11.jpg", "0,1,img/15.jpg"],
        "galleries/cs6_surveillance_to_booking_g2.csv": ["0,3,img/13.jpg", "0,2,img/12.jpg", "0,4,img/14.jpg"],
    }
    files.update(over)
    (root / "galleries").mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (root / name).write_text("HEADER\n" + "\n".join(rows) + "\n")
    return ijbs.build_protocol(str(root))


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def make_tree(root, probes, matches, distractors, raw=True):
    for base in (["aligned_pad_0.1_pad_high"] + (["tinyface/Testing_Set"] if raw else [])):
        for set_name, names in (("Probe", probes), ("Gallery_Match", matches), ("Gallery_Distractor", distractors)):
            for n in names:
                touch(root / base / set_name / n)


