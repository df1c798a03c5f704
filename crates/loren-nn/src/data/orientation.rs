//! A JPEG's EXIF orientation: a phone stores a photo as its sensor read it and says in a tag how
//! it was held. Every viewer turns the photo upright by it, so the pixels are turned here too:
//! a model would otherwise learn and predict on the photos lying on their side.

use super::folder::Decoded;

/// The EXIF tag that says how the stored image is to be turned for display.
const ORIENTATION: u16 = 0x0112;

/// The orientation (2 to 8; 1 is upright) that EXIF data `tiff` (from its TIFF header on, as a
/// JPEG's APP1 segment holds it after `Exif\0\0`) records in its first directory; `None` where it
/// records none, or none that can be read.
pub fn exif_orientation(tiff: &[u8]) -> Option<u16> {
    let big = match tiff.get(..2)? {
        b"II" => false,
        b"MM" => true,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<u16> {
        let b: [u8; 2] = tiff.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(if big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    };
    // Two SHORTs, the more significant first where the order is big-endian.
    let u32_at = |at: usize| -> Option<u32> {
        let (first, second) = (u32::from(u16_at(at)?), u32::from(u16_at(at + 2)?));
        Some(if big {
            first << 16 | second
        } else {
            second << 16 | first
        })
    };
    if u16_at(2)? != 42 {
        return None;
    }
    let directory = u32_at(4)? as usize;
    let entries = u16_at(directory)?;
    // Each entry: tag, type, count (2, 2, 4 bytes), then the value in the next 4; a SHORT sits
    // in the first two of those.
    let value = (0..usize::from(entries)).find_map(|i| {
        let entry = directory.checked_add(2 + 12 * i)?;
        let (tag, kind) = (u16_at(entry)?, u16_at(entry + 2)?);
        const SHORT: u16 = 3;
        (tag == ORIENTATION && kind == SHORT).then(|| u16_at(entry + 8))?
    })?;
    (2..=8).contains(&value).then_some(value)
}

/// `img` turned upright as EXIF `orientation` says (as PIL's `ImageOps.exif_transpose` turns
/// it): 2 mirrored, 3 turned half round, 4 flipped, 5 transposed, 6 turned a quarter clockwise,
/// 7 transposed across the other diagonal, 8 turned a quarter anticlockwise. Any other value
/// leaves it as it is.
pub fn upright(img: Decoded, orientation: u16) -> Decoded {
    let (w, h, c) = (img.width, img.height, img.channels);
    // Where output pixel (x, y) of the upright image comes from in the stored one.
    let from: fn(usize, usize, usize, usize) -> (usize, usize) = match orientation {
        2 => |x, y, w, _| (w - 1 - x, y),
        3 => |x, y, w, h| (w - 1 - x, h - 1 - y),
        4 => |x, y, _, h| (x, h - 1 - y),
        5 => |x, y, _, _| (y, x),
        6 => |x, y, _, h| (y, h - 1 - x),
        7 => |x, y, w, h| (w - 1 - y, h - 1 - x),
        8 => |x, y, w, _| (w - 1 - y, x),
        _ => return img,
    };
    let (out_w, out_h) = if orientation >= 5 { (h, w) } else { (w, h) };
    let mut samples = Vec::with_capacity(img.samples.len());
    for y in 0..out_h {
        for x in 0..out_w {
            let (sx, sy) = from(x, y, w, h);
            samples.extend_from_slice(&img.samples[(sy * w + sx) * c..][..c]);
        }
    }
    Decoded {
        width: out_w,
        height: out_h,
        channels: c,
        samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// EXIF data of one directory entry: the orientation, in either byte order.
    fn exif(orientation: u16, big: bool) -> Vec<u8> {
        let u16b = |v: u16| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let u32b = |v: u32| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let mut t = if big { b"MM".to_vec() } else { b"II".to_vec() };
        t.extend(u16b(42));
        t.extend(u32b(8));
        t.extend(u16b(2));
        // An entry of another tag first, then the orientation.
        for (tag, value) in [(0x010f, 7), (ORIENTATION, orientation)] {
            t.extend(u16b(tag));
            t.extend(u16b(3));
            t.extend(u32b(1));
            t.extend(u16b(value));
            t.extend([0, 0]);
        }
        t.extend(u32b(0));
        t
    }

    #[test]
    fn the_orientation_is_read_in_either_byte_order() {
        for big in [false, true] {
            assert_eq!(exif_orientation(&exif(6, big)), Some(6));
            assert_eq!(exif_orientation(&exif(1, big)), None);
            assert_eq!(exif_orientation(&exif(9, big)), None);
        }
        // Cut short, or not TIFF: none, and no panic.
        let whole = exif(8, false);
        for len in 0..whole.len() - 6 {
            assert_eq!(exif_orientation(&whole[..len]), None, "{len} bytes");
        }
        assert_eq!(exif_orientation(b"XX\x2a\x00\x08\x00\x00\x00"), None);
    }

    /// Each orientation turns a 3×2 image as PIL's `ImageOps.exif_transpose` does (the expected
    /// pixels are PIL 11's output for the same image).
    #[test]
    fn each_orientation_turns_the_image_as_pil_does() {
        let stored = Decoded {
            width: 3,
            height: 2,
            channels: 1,
            samples: vec![0, 10, 20, 30, 40, 50],
        };
        let pil: [(u16, [usize; 2], [u8; 6]); 8] = [
            (1, [3, 2], [0, 10, 20, 30, 40, 50]),
            (2, [3, 2], [20, 10, 0, 50, 40, 30]),
            (3, [3, 2], [50, 40, 30, 20, 10, 0]),
            (4, [3, 2], [30, 40, 50, 0, 10, 20]),
            (5, [2, 3], [0, 30, 10, 40, 20, 50]),
            (6, [2, 3], [30, 0, 40, 10, 50, 20]),
            (7, [2, 3], [50, 20, 40, 10, 30, 0]),
            (8, [2, 3], [20, 50, 10, 40, 0, 30]),
        ];
        for (orientation, [w, h], pixels) in pil {
            let turned = upright(stored.clone(), orientation);
            assert_eq!([turned.width, turned.height], [w, h], "{orientation}");
            assert_eq!(turned.samples, pixels, "{orientation}");
        }
        // Channels move together.
        let rgb = Decoded {
            width: 2,
            height: 1,
            channels: 3,
            samples: vec![1, 2, 3, 4, 5, 6],
        };
        assert_eq!(upright(rgb, 2).samples, [4, 5, 6, 1, 2, 3]);
    }
}
