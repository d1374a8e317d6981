//! CRI types from the JSON containerd writes of them (Go's `encoding/json`).
//!
//! containerd marshals CRI messages with Go's `omitempty`: a field holding its zero value
//! ("", 0, false, an empty list or map, a nil message) is left out, and the Rust CRI types
//! want every field. [`from_go_json`] reads such JSON in one pass: when a struct is read, every
//! field it declares is offered, the ones the JSON left out as a [`Zero`] that gives whatever
//! the field's type asks for its zero value, exactly what Go dropped.

use anyhow::{Context, Result};
use serde::de::{self, value::Error, Deserializer, IntoDeserializer, Visitor};
use serde_json::Value;

use super::api;

/// A CRI ContainerConfig from containerd's JSON (its verbose container status, or a
/// checkpoint's `container-config.json`).
pub fn config_from_info(value: &serde_json::Value) -> Result<api::ContainerConfig> {
    from_go_json(value)
}

/// Any CRI type from Go's `omitempty` JSON; a value of the wrong type is an error, never a
/// guess.
pub fn from_go_json<T: de::DeserializeOwned>(value: &Value) -> Result<T> {
    T::deserialize(Go(value)).context("not the CRI type containerd writes")
}

/// A JSON value read as Go wrote it.
struct Go<'a>(&'a Value);

/// The zero value of whatever type is asked for: what Go's `omitempty` left out.
struct Zero;

impl<'de> Deserializer<'de> for Go<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => v.visit_unit(),
            Value::Bool(b) => v.visit_bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => v.visit_u64(u),
                (_, Some(i), _) => v.visit_i64(i),
                (_, _, Some(f)) => v.visit_f64(f),
                _ => Err(de::Error::custom(format!("number {n} out of range"))),
            },
            Value::String(s) => v.visit_str(s),
            Value::Array(items) => {
                v.visit_seq(de::value::SeqDeserializer::new(items.iter().map(Go)))
            }
            Value::Object(map) => v.visit_map(de::value::MapDeserializer::new(
                map.iter().map(|(k, x)| (k.as_str(), Go(x))),
            )),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => v.visit_none(),
            _ => v.visit_some(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        let Value::Object(map) = self.0 else {
            return self.deserialize_any(v);
        };
        // Every declared field, the missing ones as zeros; then keys the type does not
        // declare (serde skips them; the restore policy refuses them by name elsewhere).
        let declared = fields.iter().map(|f| match map.get(*f) {
            Some(x) => (*f, Either::Go(Go(x))),
            None => (*f, Either::Zero(Zero)),
        });
        let extra = map
            .iter()
            .filter(|(k, _)| !fields.contains(&k.as_str()))
            .map(|(k, x)| (k.as_str(), Either::Go(Go(x))));
        v.visit_map(de::value::MapDeserializer::new(declared.chain(extra)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// `Zero`'s answer to each scalar type: its zero.
macro_rules! zeros {
    ($($method:ident => $visit:ident($zero:expr)),*) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            v.$visit($zero)
        }
    )*};
}

impl<'de> Deserializer<'de> for Zero {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
    zeros! {
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i8(0),
        deserialize_i16 => visit_i16(0),
        deserialize_i32 => visit_i32(0),
        deserialize_i64 => visit_i64(0),
        deserialize_u8 => visit_u8(0),
        deserialize_u16 => visit_u16(0),
        deserialize_u32 => visit_u32(0),
        deserialize_u64 => visit_u64(0),
        deserialize_f32 => visit_f32(0.0),
        deserialize_f64 => visit_f64(0.0),
        deserialize_str => visit_str(""),
        deserialize_string => visit_str(""),
        deserialize_bytes => visit_bytes(&[]),
        deserialize_byte_buf => visit_bytes(&[])
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_none()
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_seq(de::value::SeqDeserializer::new(std::iter::empty::<Zero>()))
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_map(de::value::MapDeserializer::new(std::iter::empty::<(
            &str,
            Zero,
        )>()))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_map(de::value::MapDeserializer::new(
            fields.iter().map(|f| (*f, Zero)),
        ))
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char unit unit_struct newtype_struct tuple tuple_struct enum identifier
        ignored_any
    }
}

/// A field's value: read from the JSON, or the zero Go left out.
enum Either<'a> {
    Go(Go<'a>),
    Zero(Zero),
}

/// Each of `Either`'s methods is its value's: a zero must know which type is asked for.
macro_rules! delegate {
    ($($method:ident),*) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            match self {
                Either::Go(g) => g.$method(v),
                Either::Zero(z) => z.$method(v),
            }
        }
    )*};
}

impl<'de> Deserializer<'de> for Either<'_> {
    type Error = Error;

    delegate!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_f32,
        deserialize_f64,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_seq,
        deserialize_map
    );

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        match self {
            Either::Go(g) => g.deserialize_struct(name, fields, v),
            Either::Zero(z) => z.deserialize_struct(name, fields, v),
        }
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char unit unit_struct newtype_struct tuple tuple_struct enum identifier
        ignored_any
    }
}

impl<'de, 'a> IntoDeserializer<'de, Error> for Go<'a> {
    type Deserializer = Go<'a>;
    fn into_deserializer(self) -> Go<'a> {
        self
    }
}

impl<'de> IntoDeserializer<'de, Error> for Zero {
    type Deserializer = Zero;
    fn into_deserializer(self) -> Zero {
        self
    }
}

impl<'de, 'a> IntoDeserializer<'de, Error> for Either<'a> {
    type Deserializer = Either<'a>;
    fn into_deserializer(self) -> Either<'a> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What containerd's verbose info holds (Go omitempty: zero values left out).
    #[test]
    fn a_config_with_omitted_zero_values_keeps_its_security_settings() {
        let go = serde_json::json!({
            "metadata": {"name": "web"},
            "image": {"image": "busybox"},
            "command": ["sh"],
            "linux": {
                "security_context": {
                    "capabilities": {"drop_capabilities": ["ALL"], "add_capabilities": ["CHOWN"]},
                    "run_as_user": {"value": 1000},
                    "readonly_rootfs": true,
                    "namespace_options": {"pid": 1}
                }
            },
            "mounts": [{"container_path": "/data", "host_path": "/var/lib/x"}]
        });
        let c = config_from_info(&go).unwrap();
        let sc = c.linux.unwrap().security_context.unwrap();
        assert_eq!(sc.capabilities.unwrap().drop_capabilities, ["ALL"]);
        assert_eq!(sc.run_as_user.unwrap().value, 1000);
        assert!(sc.readonly_rootfs);
        assert_eq!(sc.namespace_options.unwrap().pid, 1);
        assert_eq!(c.mounts[0].host_path, "/var/lib/x");
        assert!(!c.mounts[0].readonly);
        // Not a config at all: an error, never a guess.
        assert!(config_from_info(&serde_json::json!({"linux": 5})).is_err());
    }

    #[test]
    fn pod_configs_read_in_one_pass_keep_maps_lists_and_numbers() {
        let go = serde_json::json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "u1"},
            "hostname": "web-0",
            "labels": {"app": "web"},
            "port_mappings": [{"container_port": 80}, {"host_port": 8080, "protocol": 1}],
            "linux": {"sysctls": {"net.ipv4.ip_forward": "1"}, "security_context": {}}
        });
        let p: api::PodSandboxConfig = from_go_json(&go).unwrap();
        let md = p.metadata.unwrap();
        assert_eq!((md.name.as_str(), md.attempt), ("web", 0));
        assert_eq!(p.labels["app"], "web");
        assert!(p.annotations.is_empty());
        assert_eq!(p.port_mappings[0].container_port, 80);
        assert_eq!(p.port_mappings[0].host_port, 0);
        assert_eq!(
            (p.port_mappings[1].host_port, p.port_mappings[1].protocol),
            (8080, 1)
        );
        let linux = p.linux.unwrap();
        assert_eq!(linux.sysctls["net.ipv4.ip_forward"], "1");
        // A message present but empty is Some, its fields zero; one left out is None.
        let sc = linux.security_context.unwrap();
        assert!(!sc.privileged && sc.namespace_options.is_none());
        assert!(p.dns_config.is_none());
    }

    #[test]
    fn values_of_the_wrong_type_are_errors() {
        for bad in [
            serde_json::json!({"hostname": 5}),
            serde_json::json!({"labels": ["a"]}),
            serde_json::json!({"port_mappings": {"container_port": 80}}),
            serde_json::json!({"metadata": {"attempt": "one"}}),
            serde_json::json!("a string"),
        ] {
            assert!(
                from_go_json::<api::PodSandboxConfig>(&bad).is_err(),
                "{bad}"
            );
        }
    }
}
