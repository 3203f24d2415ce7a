//! Just enough of a BTF reader for the kernel diagnostics: enum members
//! (drop and reset reason names), struct member offsets (the fields the
//! programs read, see `offsets.rs`) and tracepoint prototypes.
//!
//! aya parses BTF too, but keeps its types crate-private; the format is small
//! and stable (`Documentation/bpf/btf.rst`), so this reads it directly from
//! `/sys/kernel/btf/vmlinux`. Only the running kernel's own (little- or
//! big-endian, native) BTF is read.

use std::collections::HashMap;

/// The kernel's BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF)")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not BTF: {0}")]
    Format(String),
    #[error("BTF has no {0}")]
    Missing(String),
}

// Kinds, as numbered in `include/uapi/linux/btf.h`.
const KIND_INT: u8 = 1;
const KIND_PTR: u8 = 2;
const KIND_ARRAY: u8 = 3;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_ENUM: u8 = 6;
const KIND_FWD: u8 = 7;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_FUNC: u8 = 12;
const KIND_FUNC_PROTO: u8 = 13;
const KIND_VAR: u8 = 14;
const KIND_DATASEC: u8 = 15;
const KIND_FLOAT: u8 = 16;
const KIND_DECL_TAG: u8 = 17;
const KIND_TYPE_TAG: u8 = 18;
const KIND_ENUM64: u8 = 19;

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    ty: u32,
    /// Bit offset from the start of the struct.
    bit_offset: u32,
    /// Non-zero for a bitfield.
    bitfield_size: u32,
}

#[derive(Debug, Clone)]
enum Kind {
    /// Ints, floats, forward declarations, variables, sections, tags: only
    /// their names matter here.
    Other,
    Ptr(u32),
    Array,
    Struct(Vec<Member>),
    Union(Vec<Member>),
    Enum(Vec<(u32, i64)>),
    Typedef(u32),
    /// const, volatile, restrict, type tags: see through them.
    Modifier(u32),
    FuncProto(Vec<u32>),
}

#[derive(Debug, Clone)]
struct Type {
    name: u32,
    kind: Kind,
}

/// A parsed BTF blob.
pub struct Btf {
    /// Index = type id; id 0 is `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<String, Vec<u32>>,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    big_endian: bool,
}

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, BtfError> {
        let bytes: [u8; 4] = self
            .data
            .get(self.pos..self.pos + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| BtfError::Format(format!("truncated at byte {}", self.pos)))?;
        self.pos += 4;
        Ok(if self.big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    }

    fn skip(&mut self, n: usize) {
        self.pos += n;
    }
}

impl Btf {
    /// The running kernel's BTF.
    pub fn vmlinux() -> Result<Self, BtfError> {
        let data = std::fs::read(VMLINUX).map_err(|source| BtfError::Read {
            path: VMLINUX.into(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data
            .get(..2)
            .ok_or_else(|| BtfError::Format("empty".into()))?;
        let big_endian = match u16::from_le_bytes([magic[0], magic[1]]) {
            MAGIC => false,
            m if m.swap_bytes() == MAGIC => true,
            m => return Err(BtfError::Format(format!("bad magic {m:#x}"))),
        };
        let mut header = Reader {
            data,
            pos: 4,
            big_endian,
        };
        let hdr_len = header.u32()? as usize;
        let type_off = header.u32()? as usize;
        let type_len = header.u32()? as usize;
        let str_off = header.u32()? as usize;
        let str_len = header.u32()? as usize;
        let section = |off: usize, len: usize, what: &str| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or_else(|| BtfError::Format(format!("{what} section out of bounds")))
        };
        let type_data = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?.to_vec();

        let mut types = vec![Type {
            name: 0,
            kind: Kind::Other,
        }];
        let mut r = Reader {
            data: type_data,
            pos: 0,
            big_endian,
        };
        while r.pos < type_data.len() {
            types.push(read_type(&mut r)?);
        }
        let mut btf = Btf {
            types,
            strings,
            by_name: HashMap::new(),
        };
        for id in 1..btf.types.len() as u32 {
            let name = btf.name(btf.types[id as usize].name);
            if !name.is_empty() {
                btf.by_name.entry(name.to_string()).or_default().push(id);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        self.types.get(id as usize)
    }

    /// Ids of the types called `name`.
    fn named(&self, name: &str) -> impl Iterator<Item = (u32, &Type)> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|id| Some((*id, self.ty(*id)?)))
    }

    /// The members of `enum name` (or `enum64`), as (name, value).
    pub fn enum_members(&self, name: &str) -> Result<Vec<(String, i64)>, BtfError> {
        self.named(name)
            .find_map(|(_, t)| match &t.kind {
                Kind::Enum(members) => Some(
                    members
                        .iter()
                        .map(|(n, v)| (self.name(*n).to_string(), *v))
                        .collect(),
                ),
                _ => None,
            })
            .ok_or_else(|| BtfError::Missing(format!("enum {name}")))
    }

    /// Names of every enum whose name ends in `suffix`.
    pub fn enums_ending_with(&self, suffix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .by_name
            .iter()
            .filter(|(n, ids)| {
                n.ends_with(suffix)
                    && ids
                        .iter()
                        .any(|id| matches!(self.types[*id as usize].kind, Kind::Enum(_)))
            })
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    /// Byte offset of `path` (member names, each inside the previous one's
    /// struct or union type) in `struct name`. Members of anonymous structs
    /// and unions are found as if they were direct members, as in C.
    pub fn member_offset(&self, name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let missing = || BtfError::Missing(format!("struct {name} member {}", path.join(".")));
        let mut ty = self
            .named(name)
            .find(|(_, t)| matches!(t.kind, Kind::Struct(_) | Kind::Union(_)))
            .map(|(id, _)| id)
            .ok_or_else(missing)?;
        let mut bits = 0u32;
        for field in path {
            let (offset, member_ty) = self.find_member(ty, field, 0).ok_or_else(missing)?;
            bits += offset;
            ty = self.resolve(member_ty);
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Missing(format!(
                "byte-aligned struct {name} member {}",
                path.join(".")
            )));
        }
        Ok(bits / 8)
    }

    /// Finds `field` in the struct/union `ty`, recursing into anonymous
    /// members; returns its bit offset and type. Bitfields are not found
    /// (the programs read whole bytes).
    fn find_member(&self, ty: u32, field: &str, depth: usize) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        let members = match &self.ty(self.resolve(ty))?.kind {
            Kind::Struct(m) | Kind::Union(m) => m,
            _ => return None,
        };
        for m in members {
            let name = self.name(m.name);
            if name == field {
                return (m.bitfield_size == 0).then_some((m.bit_offset, m.ty));
            }
            if name.is_empty()
                && let Some((off, t)) = self.find_member(m.ty, field, depth + 1)
            {
                return Some((m.bit_offset + off, t));
            }
        }
        None
    }

    /// Sees through typedefs and modifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.ty(id).map(|t| &t.kind) {
                Some(Kind::Typedef(next) | Kind::Modifier(next)) => id = *next,
                _ => break,
            }
        }
        id
    }

    /// The arguments of a tracepoint as C type names, from the
    /// `btf_trace_<name>` typedef the kernel declares for every tracepoint
    /// (without its leading `void *` context argument).
    pub fn tracepoint_args(&self, tracepoint: &str) -> Result<Vec<String>, BtfError> {
        let typedef = format!("btf_trace_{tracepoint}");
        let missing = || BtfError::Missing(format!("tracepoint {tracepoint} ({typedef})"));
        let (_, t) = self
            .named(&typedef)
            .find(|(_, t)| matches!(t.kind, Kind::Typedef(_)))
            .ok_or_else(missing)?;
        let Kind::Typedef(target) = t.kind else {
            return Err(missing());
        };
        let proto = match self.ty(self.resolve(target)).map(|t| &t.kind) {
            Some(Kind::Ptr(p)) => self.resolve(*p),
            _ => return Err(missing()),
        };
        match self.ty(proto).map(|t| &t.kind) {
            Some(Kind::FuncProto(params)) => Ok(params
                .iter()
                .skip(1)
                .map(|p| self.type_name(*p, 0))
                .collect()),
            _ => Err(missing()),
        }
    }

    /// A C-ish name of a type: `struct sk_buff *`, `enum skb_drop_reason`,
    /// `int`. Qualifiers are dropped.
    fn type_name(&self, id: u32, depth: usize) -> String {
        if depth > 8 {
            return "?".into();
        }
        let Some(t) = self.ty(id) else {
            return "?".into();
        };
        let name = self.name(t.name);
        match &t.kind {
            _ if id == 0 => "void".into(),
            Kind::Modifier(next) => self.type_name(*next, depth + 1),
            Kind::Ptr(target) => format!("{} *", self.type_name(*target, depth + 1)),
            Kind::Struct(_) => format!("struct {name}"),
            Kind::Union(_) => format!("union {name}"),
            Kind::Enum(_) => format!("enum {name}"),
            _ => name.to_string(),
        }
    }
}

fn read_type(r: &mut Reader<'_>) -> Result<Type, BtfError> {
    let name = r.u32()?;
    let info = r.u32()?;
    let size_or_type = r.u32()?;
    let vlen = (info & 0xffff) as usize;
    let kind_code = ((info >> 24) & 0x1f) as u8;
    let kind_flag = info >> 31 == 1;
    let kind = match kind_code {
        KIND_INT => {
            r.skip(4);
            Kind::Other
        }
        KIND_PTR => Kind::Ptr(size_or_type),
        KIND_ARRAY => {
            r.skip(12);
            Kind::Array
        }
        KIND_STRUCT | KIND_UNION => {
            let mut members = Vec::with_capacity(vlen);
            for _ in 0..vlen {
                let name = r.u32()?;
                let ty = r.u32()?;
                let offset = r.u32()?;
                let (bit_offset, bitfield_size) = if kind_flag {
                    (offset & 0xff_ffff, offset >> 24)
                } else {
                    (offset, 0)
                };
                members.push(Member {
                    name,
                    ty,
                    bit_offset,
                    bitfield_size,
                });
            }
            if kind_code == KIND_STRUCT {
                Kind::Struct(members)
            } else {
                Kind::Union(members)
            }
        }
        KIND_ENUM => {
            let mut members = Vec::with_capacity(vlen);
            for _ in 0..vlen {
                let name = r.u32()?;
                let raw = r.u32()?;
                // kind_flag marks a signed enum.
                let value = if kind_flag {
                    i64::from(raw as i32)
                } else {
                    i64::from(raw)
                };
                members.push((name, value));
            }
            Kind::Enum(members)
        }
        KIND_ENUM64 => {
            let mut members = Vec::with_capacity(vlen);
            for _ in 0..vlen {
                let name = r.u32()?;
                let lo = r.u32()?;
                let hi = r.u32()?;
                members.push((name, ((u64::from(hi) << 32) | u64::from(lo)) as i64));
            }
            Kind::Enum(members)
        }
        KIND_TYPEDEF => Kind::Typedef(size_or_type),
        KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => Kind::Modifier(size_or_type),
        KIND_FUNC_PROTO => {
            let mut params = Vec::with_capacity(vlen);
            for _ in 0..vlen {
                let _name = r.u32()?;
                params.push(r.u32()?);
            }
            Kind::FuncProto(params)
        }
        KIND_VAR | KIND_DECL_TAG => {
            r.skip(4);
            Kind::Other
        }
        KIND_DATASEC => {
            r.skip(12 * vlen);
            Kind::Other
        }
        KIND_FWD | KIND_FUNC | KIND_FLOAT => Kind::Other,
        other => return Err(BtfError::Format(format!("unknown BTF kind {other}"))),
    };
    Ok(Type { name, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob from (name, info, size_or_type, extra words).
    fn blob(strings: &[&str], types: &[(u32, u32, u32, Vec<u32>)]) -> (Vec<u8>, Vec<u32>) {
        let mut str_section = vec![0u8];
        let mut offsets = Vec::new();
        for s in strings {
            offsets.push(str_section.len() as u32);
            str_section.extend_from_slice(s.as_bytes());
            str_section.push(0);
        }
        let mut type_section = Vec::new();
        for (name, info, size, extra) in types {
            for w in [*name, *info, *size].iter().chain(extra) {
                type_section.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            type_section.len() as u32,
            type_section.len() as u32,
            str_section.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&type_section);
        out.extend_from_slice(&str_section);
        (out, offsets)
    }

    fn info(kind: u8, vlen: u32, flag: bool) -> u32 {
        (u32::from(kind) << 24) | vlen | if flag { 1 << 31 } else { 0 }
    }

    #[test]
    fn reads_enums_anonymous_members_and_tracepoint_prototypes() {
        let names = [
            "int",             // 0
            "skb_drop_reason", // 1
            "A",               // 2
            "B",               // 3
            "sk_buff",         // 4
            "len",             // 5
            "dev",             // 6
            "btf_trace_x",     // 7
            "sk",              // 8
        ];
        // Offsets of the names are only known after building, so build
        // twice: first to learn them.
        let (_, off) = blob(&names, &[]);
        let types = vec![
            // 1: int
            (off[0], info(KIND_INT, 0, false), 4, vec![32]),
            // 2: enum skb_drop_reason { A = 1, B = 3 }
            (
                off[1],
                info(KIND_ENUM, 2, false),
                4,
                vec![off[2], 1, off[3], 3],
            ),
            // 3: anonymous union { int dev; }
            (0, info(KIND_UNION, 1, false), 8, vec![off[6], 1, 0]),
            // 4: struct sk_buff { int len @ 0; union @ 64 bits; int bits:3 @ 96 }
            (
                off[4],
                info(KIND_STRUCT, 3, true),
                16,
                vec![off[5], 1, 0, 0, 3, 64, off[8], 1, (3 << 24) | 96],
            ),
            // 5: ptr to 4
            (0, info(KIND_PTR, 0, false), 4, vec![]),
            // 6: void (*)(void *, struct sk_buff *, enum skb_drop_reason)
            (
                0,
                info(KIND_FUNC_PROTO, 3, false),
                0,
                vec![0, 7, 0, 5, 0, 2],
            ),
            // 7: ptr to void
            (0, info(KIND_PTR, 0, false), 0, vec![]),
            // 8: ptr to 6; 9: typedef btf_trace_x -> 8
            (0, info(KIND_PTR, 0, false), 6, vec![]),
            (off[7], info(KIND_TYPEDEF, 0, false), 8, vec![]),
        ];
        // Pointer targets live in size_or_type.
        let mut types = types;
        types[4].2 = 4;
        let (data, _) = blob(&names, &types);
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(
            btf.enum_members("skb_drop_reason").unwrap(),
            vec![("A".to_string(), 1), ("B".to_string(), 3)]
        );
        assert_eq!(btf.member_offset("sk_buff", &["len"]).unwrap(), 0);
        assert_eq!(btf.member_offset("sk_buff", &["dev"]).unwrap(), 8);
        assert!(
            btf.member_offset("sk_buff", &["sk"]).is_err(),
            "bitfields are not offered"
        );
        assert_eq!(
            btf.tracepoint_args("x").unwrap(),
            vec!["struct sk_buff *", "enum skb_drop_reason"]
        );
        assert!(btf.tracepoint_args("y").is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0]).is_err());
        let mut data = blob(&["x"], &[(1, info(KIND_STRUCT, 5, false), 4, vec![])]).0;
        data.truncate(data.len() - 1);
        assert!(Btf::parse(&data).is_err());
    }

    /// The running kernel's BTF, where there is one: the fields the programs
    /// read must all resolve.
    #[test]
    fn vmlinux_has_what_the_programs_read() {
        let Ok(btf) = Btf::vmlinux() else {
            eprintln!("no readable {VMLINUX}; skipped");
            return;
        };
        assert!(btf.member_offset("sk_buff", &["network_header"]).is_ok());
        assert!(
            btf.member_offset("sock", &["__sk_common", "skc_net", "net"])
                .is_ok()
        );
        let reasons = btf.enum_members("skb_drop_reason").unwrap();
        assert!(
            reasons
                .iter()
                .any(|(n, _)| n == "SKB_DROP_REASON_NO_SOCKET")
        );
        let args = btf.tracepoint_args("kfree_skb").unwrap();
        assert_eq!(args[0], "struct sk_buff *");
        assert_eq!(args[2], "enum skb_drop_reason");
    }
}
